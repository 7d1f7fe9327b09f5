"""Export a VGG to ONNX, built with the `onnx` package's helper API (no hand-written protobuf).

    python -m minivgg.pretrained convert runs/x/best.npz model.onnx      # the format is
    python -m minivgg.pretrained info model.onnx                         # the extension's
    export_onnx(model, "model.onnx", head="dense", softmax=True)

The graph, at opset `OPSET` (17): Conv, Relu, MaxPool (ceil_mode=1 when the model pools as
Caffe does), LRN, Flatten, Gemm, and an optional Softmax; dropout is left out (the
identity at test time). The input is "input", float32 (batch, 3, H, W) with a dynamic batch
dimension. Two heads:

* "fc" (default): the classifier as trained; H = W = the model's input size; output
  "logits" (batch, K), or "probs" with `softmax`.
* "dense": Sec. 3.2's fully-convolutional net (fc6 a p×p Conv, fc7/fc8 1×1 Convs) for
  images of any size (H and W dynamic too, at least the input size); outputs "logits"
  (batch, K), the score map averaged over space (GlobalAveragePool, then Flatten; or
  "probs"), and "score_map" (batch, K, h, w). The window grid sits at the top-left corner
  (`minivgg.evaluate.dense_crop(align="top-left")`); to centre it, crop the image to a
  multiple of 32 around its centre first, as `evaluate.dense_crop` does.

The model's metadata (`metadata_props`, keys "minivgg.*") records what a user needs to feed
it: the input's name and shape, the channel order, and the preprocessing, x = (pixel -
mean) / std on the 0-255 scale per channel in that order (std absent: no division), plus the
configuration, head, opset and class ids where known. `describe` prints them.

Channel order: minivgg models take RGB. Weights born in Caffe (the authors' release) were
trained on BGR; `channel_order="auto"` exports those as the authors' net, taking BGR minus
[103.939, 116.779, 123.68] (conv1_1's input channels reversed back), everything else as RGB.

NOTE: LRN's α. ONNX's LRN divides its `alpha` by `size` (as Caffe and PyTorch do): it
computes x / (bias + alpha/size * Σ x²)^beta. minivgg's model holds the paper's α, which
multiplies the plain sum (Sec. 2.1), unless the layer says `alpha_over_n`; so the exported
`alpha` is α * size for the paper's convention and α for Caffe's.
"""

import json
import os

import numpy as np

from minivgg import backend, checkpoint
from minivgg import nn

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12), so older runtimes load the file
HEADS = ("fc", "dense")
CHANNEL_ORDERS = ("auto", "rgb", "bgr")
PREFIX = "minivgg."


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ImportError("writing or reading ONNX needs the 'onnx' package: pip install "
                          "'minivgg[onnx]' (or pip install onnx)") from None
    return onnx, helper, numpy_helper


# ----------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------

def build_onnx(model, head="fc", softmax=False, channel_order="auto"):
    """The ONNX ModelProto of `model` (a minivgg VGG); see the module docstring."""
    onnx, helper, numpy_helper = _onnx()
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    bgr = _is_bgr(model, channel_order)
    nodes, weights = [], []
    x = "input"

    def param(name, array):
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    for name, layer in model.named_children():
        if name == "flatten" and head == "dense":
            break
        x = _layer_node(name, layer, x, param, node, bgr)
    outputs = []
    K = model.num_classes
    if head == "dense":
        x = _dense_head(model, x, param, node)
        outputs.append(helper.make_tensor_value_info(
            x, onnx.TensorProto.FLOAT, ["batch", K, "map_height", "map_width"]))
        score_map = x
        x = node("Flatten", [node("GlobalAveragePool", [score_map], "score_mean")], "logits",
                 axis=1)
        height, width = "height", "width"
    else:
        nodes[-1].output[0] = x = "logits"  # fc8 writes the graph's output directly
        height = width = model.input_size
    if softmax:
        x = node("Softmax", ["logits"], "probs", axis=1)
    outputs.insert(0, helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["batch", K]))
    graph = helper.make_graph(
        nodes, f"vgg_{model.config.lower().replace('-', '_')}",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                       ["batch", 3, height, width])],
        outputs, initializer=weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="minivgg", ir_version=IR_VERSION)
    helper.set_model_props(proto, _metadata(model, head, softmax, bgr, height, width))
    return proto


def _layer_node(name, layer, x, param, node, bgr):
    """Add the ONNX node of one minivgg layer reading tensor `x` -> the tensor it writes."""
    if isinstance(layer, nn.Conv2d):
        W = backend.to_numpy(layer.weight.data)
        if name == "conv1_1" and bgr:
            W = W[:, ::-1]  # minivgg's RGB filters back to the Caffe net's BGR
        inputs = [x, param(f"{name}.weight", W)]
        if layer.bias is not None:
            inputs.append(param(f"{name}.bias", backend.to_numpy(layer.bias.data)))
        kh, kw = layer.kernel_size
        pad = layer.padding
        x = node("Conv", inputs, name, kernel_shape=[kh, kw], strides=[layer.stride] * 2,
                 pads=[pad] * 4)
    elif isinstance(layer, nn.ReLU):
        x = node("Relu", [x], name)
    elif isinstance(layer, nn.MaxPool2d):
        k = layer.kernel_size
        x = node("MaxPool", [x], name, kernel_shape=[k, k],
                 strides=[layer.stride or k] * 2, ceil_mode=int(layer.ceil_mode))
    elif isinstance(layer, nn.LocalResponseNorm):
        x = node("LRN", [x], name, **_lrn_attributes(layer))
    elif isinstance(layer, nn.Flatten):
        x = node("Flatten", [x], name, axis=1)
    elif isinstance(layer, nn.Dropout):
        pass  # the identity at test time
    elif isinstance(layer, nn.Linear):
        x = node("Gemm", [x, param(f"{name}.weight", backend.to_numpy(layer.weight.data)),
                          param(f"{name}.bias", backend.to_numpy(layer.bias.data))],
                 name, transB=1)
    else:
        raise ValueError(f"export_onnx: no ONNX operator for layer {name} "
                         f"({type(layer).__name__})")
    return x


def _dense_head(model, x, param, node):
    """fc6 as a p×p Conv, fc7 and fc8 as 1×1 Convs (Sec. 3.2), with their ReLUs."""
    from minivgg.evaluate import to_fully_convolutional
    fcn = to_fully_convolutional(model)
    for name in ("fc6", "relu6", "fc7", "relu7", "fc8"):
        layer = getattr(fcn, name)
        if name.startswith("relu"):
            x = node("Relu", [x], name)
            continue
        k = layer.kernel_size[0]
        x = node("Conv", [x, param(f"{name}.weight", backend.to_numpy(layer.weight.data)),
                          param(f"{name}.bias", backend.to_numpy(layer.bias.data))],
                 name if name != "fc8" else "score_map", kernel_shape=[k, k])
    return x


def _rounded(values):
    return [round(float(v), 3) for v in values]


def _lrn_attributes(layer):
    """ONNX LRN attributes of a minivgg LRN layer (see the module NOTE on α)."""
    if layer.size % 2 == 0:  # ONNX and PyTorch place an even window differently
        raise ValueError(f"export_onnx: LRN of even size {layer.size} has no exact ONNX "
                         "equivalent (the window is placed differently)")
    alpha = layer.alpha if layer.alpha_over_n else layer.alpha * layer.size
    return dict(size=int(layer.size), alpha=float(alpha), beta=float(layer.beta),
                bias=float(layer.k))


def _meta(model):
    return getattr(model, "pretrained_meta", None) or {}


def _is_bgr(model, channel_order):
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"unknown channel order {channel_order!r}; expected one of "
                         f"{', '.join(CHANNEL_ORDERS)}")
    if channel_order == "auto":
        return "caffe" in (_meta(model).get("layout"), _meta(model).get("source_layout"))
    return channel_order == "bgr"


def _metadata(model, head, softmax, bgr, height, width):
    """{key: str} stored in the file's metadata_props (see the module docstring)."""
    meta = _meta(model)
    mean, std = meta.get("mean_rgb"), meta.get("std_rgb")
    order = "BGR" if bgr else "RGB"
    if bgr:
        mean = None if mean is None else list(mean)[::-1]
        std = None if std is None else list(std)[::-1]
    if mean is None:
        how = "unknown (the model records no mean colour)"
    else:
        how = f"{order} pixels on the 0-255 scale minus the mean {_rounded(mean)}"
        how += "" if std is None else f", divided by {_rounded(std)}"
    props = {"config": model.config, "head": head, "opset": str(OPSET),
             "input_name": "input",
             "input_shape": json.dumps(["batch", 3, height, width]),
             "output": "probs" if softmax else "logits",
             "channel_order": order, "mean": json.dumps(mean), "std": json.dumps(std),
             "preprocessing": how, "pool_ceil_mode": str(bool(model.ceil_mode)).lower(),
             "num_classes": str(model.num_classes), "input_size": str(model.input_size),
             "source_layout": str(meta.get("layout", "minivgg"))}
    if meta.get("classes"):
        props["classes"] = json.dumps(list(meta["classes"]))
    return {PREFIX + k: v for k, v in props.items()}


# ----------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------

def export_onnx(model, path, head="fc", softmax=False, channel_order="auto", overwrite=False,
                check=True):
    """Write `model` to `path` (.onnx) atomically; returns the ModelProto.

    The file is written under a temporary name in the same folder and only then given its
    name, so an interrupted export leaves no half-written file, and an existing `path` is
    kept (FileExistsError) unless `overwrite`. `check` runs `onnx.checker.check_model`.
    """
    path = os.fspath(path)
    check_output(path, overwrite)
    onnx, _, _ = _onnx()
    proto = build_onnx(model, head, softmax, channel_order)
    if check:
        onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    checkpoint.atomic_write(path, lambda f: f.write(blob), suffix=".onnx",
                            overwrite=overwrite)
    return proto


def check_output(path, overwrite=False):
    """Refuse an output that is not .onnx, or one that exists (without `overwrite`)."""
    if not path.endswith(".onnx"):
        raise ValueError(f"export_onnx: the output must end in .onnx, got {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; it was left as it is (add --overwrite to "
                              "replace it, or choose another name)")


def read_metadata(path):
    """{key: value} of the "minivgg.*" metadata of an .onnx file (values as stored)."""
    onnx, _, _ = _onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX file ({type(e).__name__})") from e
    props = {p.key[len(PREFIX):]: p.value for p in proto.metadata_props
             if p.key.startswith(PREFIX)}
    props["_opset"] = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}"
                                for o in proto.opset_import)
    props["_inputs"] = [_value_info_text(v) for v in proto.graph.input]
    props["_outputs"] = [_value_info_text(v) for v in proto.graph.output]
    return props


def _value_info_text(v):
    dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
    return f"{v.name} ({', '.join(dims)})"


def describe(path):
    """The lines `python -m minivgg.pretrained info model.onnx` prints."""
    m = read_metadata(path)
    lines = [f"{path}: ONNX, opset {m['_opset']}",
             f"  inputs: {'; '.join(m['_inputs'])}",
             f"  outputs: {'; '.join(m['_outputs'])}"]
    if "config" not in m:
        return "\n".join(lines + ["  (no minivgg metadata: not written by minivgg)"])
    lines += [f"  VGG {m['config']}, {m['head']} head, {m['num_classes']} classes, trained "
              f"on {m['input_size']}x{m['input_size']} crops; pool ceil mode: "
              f"{m['pool_ceil_mode']}",
              f"  preprocessing: {m['preprocessing']} (channel order {m['channel_order']}, "
              f"NCHW float32)"]
    if "classes" in m:
        classes = json.loads(m["classes"])
        lines.append(f"  classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}")
    return "\n".join(lines)
