"""The authors' own weights: Caffe's `.caffemodel` files, read without Caffe.

The paper released its two best models (Sec. 1), D and E, as `VGG_ILSVRC_16_layers.caffemodel`
and `VGG_ILSVRC_19_layers.caffemodel` with a `deploy.prototxt` each. A `.caffemodel` is one
protocol-buffer message, Caffe's `NetParameter`: a list of layers, each with its name, type,
parameters and weight blobs. We read it with the `protobuf` library and a subset of
`caffe.proto` (the messages and fields a VGG uses, same names and field numbers), built at
run time with protobuf's descriptor API (`SCHEMA` below) rather than compiled by protoc: no
generated file to keep in step with the protobuf version, and the schema reads as a table.

Caffe's conventions, and what we do with them:

* Two layer formats: the old `layers` (V1LayerParameter, type an enum such as CONVOLUTION),
  in which the VGG files were written, and the new `layer` (LayerParameter, type a string
  such as "Convolution"). Both are read.
* Blob shapes: old blobs give (num, channels, height, width), so fc6's weight is
  (1, 1, 4096, 25088) and a bias (1, 1, 1, 64); new blobs give `shape.dim`. We go by the
  element counts and the layer's outputs.
* fc6 flattens pool5's (C, H, W) map in C-major order, the same order as minivgg's `Flatten`,
  so its weight is used as it is (no reordering).
* Input: BGR pixels on the 0-255 scale minus the mean [103.939, 116.779, 123.68] (B, G, R).
  minivgg feeds RGB pixels minus the mean RGB (Sec. 2.1), so we reverse conv1_1's input
  channels; the model then takes RGB minus [123.68, 116.779, 103.939], which it records in
  `model.pretrained_meta["mean_rgb"]`.
* Caffe's max-pool rounds its output size up (ceil mode). At 224×224, and at any size
  whose halvings stay even, that is floor mode; elsewhere it decides which pixels dense
  evaluation sees. The model records it as `model.ceil_mode = True`.

NOTE: `BlobProto.data` is `repeated float data = 5 [packed = true]` in caffe.proto. A packed
field is one length-delimited record holding the little-endian floats back to back, which is
exactly how a `bytes` field is stored, so `SCHEMA` declares it as `bytes` and NumPy views the
138 million floats of VGG-16 at once instead of protobuf building a Python float for each.
`build_schema(float_data_as_bytes=False)` gives the declaration as in caffe.proto; the tests
write files with it and read them back with the bytes view.
"""

import os
from collections import namedtuple

import numpy as np

from minivgg import nn
from minivgg.models import CONFIGS, canonical_config, parse_layer
from minivgg.pretrained.layouts import build_model

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # the release's mean pixel (B, G, R), 0-255
CAFFE_INPUT = {"mean_rgb": list(CAFFE_MEAN_BGR[::-1]), "std_rgb": None}

# Where the real files come from (downloaded by the user; nothing is fetched here).
VGG_PROJECT_PAGE = "https://www.robots.ox.ac.uk/~vgg/research/very_deep/"

# ----------------------------------------------------------------------------------------
# The caffe.proto subset: (message, [(field, number, type, label, default)])
# ----------------------------------------------------------------------------------------

# V1LayerParameter.LayerType, whole, so any V1 prototxt parses. Caffe nests this enum (and
# PoolMethod) in its message; a nested and a top-level enum read and write the same bytes.
V1_LAYER_TYPES = [
    ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
    ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39),
    ("DROPOUT", 6), ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38),
    ("FLATTEN", 8), ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28),
    ("IM2COL", 11), ("IMAGE_DATA", 12), ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14),
    ("LRN", 15), ("MEMORY_DATA", 29), ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34),
    ("POOLING", 17), ("POWER", 26), ("RELU", 18), ("SIGMOID", 19),
    ("SIGMOID_CROSS_ENTROPY_LOSS", 27), ("SILENCE", 36), ("SOFTMAX", 20),
    ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33), ("TANH", 23), ("WINDOW_DATA", 24),
    ("THRESHOLD", 31),
]
ENUMS = {"V1LayerType": V1_LAYER_TYPES, "PoolMethod": [("MAX", 0), ("AVE", 1),
                                                       ("STOCHASTIC", 2)]}

SCHEMA = {
    "BlobShape": [("dim", 1, "int64", "packed")],
    "BlobProto": [("shape", 7, "BlobShape", "optional"),
                  ("data", 5, "bytes", "optional"),          # float, packed: see the NOTE
                  ("double_data", 8, "bytes", "optional"),   # double, packed
                  ("num", 1, "int32", "optional"), ("channels", 2, "int32", "optional"),
                  ("height", 3, "int32", "optional"), ("width", 4, "int32", "optional")],
    "ConvolutionParameter": [
        ("num_output", 1, "uint32", "optional"), ("bias_term", 2, "bool", "optional", "true"),
        ("pad", 3, "uint32", "repeated"), ("kernel_size", 4, "uint32", "repeated"),
        ("group", 5, "uint32", "optional", "1"), ("stride", 6, "uint32", "repeated"),
        ("pad_h", 9, "uint32", "optional"), ("pad_w", 10, "uint32", "optional"),
        ("kernel_h", 11, "uint32", "optional"), ("kernel_w", 12, "uint32", "optional"),
        ("stride_h", 13, "uint32", "optional"), ("stride_w", 14, "uint32", "optional"),
        ("dilation", 18, "uint32", "repeated")],
    "PoolingParameter": [
        ("pool", 1, "PoolMethod", "optional"), ("kernel_size", 2, "uint32", "optional"),
        ("stride", 3, "uint32", "optional", "1"), ("pad", 4, "uint32", "optional"),
        ("kernel_h", 5, "uint32", "optional"), ("kernel_w", 6, "uint32", "optional"),
        ("stride_h", 7, "uint32", "optional"), ("stride_w", 8, "uint32", "optional"),
        ("pad_h", 9, "uint32", "optional"), ("pad_w", 10, "uint32", "optional"),
        ("global_pooling", 12, "bool", "optional")],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", "optional"), ("bias_term", 2, "bool", "optional", "true"),
        ("axis", 5, "int32", "optional", "1"), ("transpose", 6, "bool", "optional")],
    "LRNParameter": [
        ("local_size", 1, "uint32", "optional", "5"), ("alpha", 2, "float", "optional", "1"),
        ("beta", 3, "float", "optional", "0.75"), ("k", 5, "float", "optional", "1")],
    "InputParameter": [("shape", 1, "BlobShape", "repeated")],
    "LayerParameter": [
        ("name", 1, "string", "optional"), ("type", 2, "string", "optional"),
        ("bottom", 3, "string", "repeated"), ("top", 4, "string", "repeated"),
        ("blobs", 7, "BlobProto", "repeated"),
        ("convolution_param", 106, "ConvolutionParameter", "optional"),
        ("inner_product_param", 117, "InnerProductParameter", "optional"),
        ("lrn_param", 118, "LRNParameter", "optional"),
        ("pooling_param", 121, "PoolingParameter", "optional"),
        ("input_param", 143, "InputParameter", "optional")],
    "V1LayerParameter": [
        ("bottom", 2, "string", "repeated"), ("top", 3, "string", "repeated"),
        ("name", 4, "string", "optional"), ("type", 5, "V1LayerType", "optional"),
        ("blobs", 6, "BlobProto", "repeated"),
        ("convolution_param", 10, "ConvolutionParameter", "optional"),
        ("inner_product_param", 17, "InnerProductParameter", "optional"),
        ("lrn_param", 18, "LRNParameter", "optional"),
        ("pooling_param", 19, "PoolingParameter", "optional")],
    "NetParameter": [
        ("name", 1, "string", "optional"), ("layers", 2, "V1LayerParameter", "repeated"),
        ("input", 3, "string", "repeated"), ("input_dim", 4, "int32", "repeated"),
        ("input_shape", 8, "BlobShape", "repeated"),
        ("layer", 100, "LayerParameter", "repeated")],
}

_schema_cache = {}


def build_schema(float_data_as_bytes=True):
    """{message name: protobuf message class} for the `SCHEMA` subset of caffe.proto.

    Built once per flavour in a private descriptor pool, so it never clashes with a real
    `caffe_pb2` a user may have imported.
    """
    if float_data_as_bytes in _schema_cache:
        return _schema_cache[float_data_as_bytes]
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        raise ImportError("reading Caffe files needs the 'protobuf' package: pip install "
                          "'minivgg[weights]' (or pip install protobuf)") from None
    F = descriptor_pb2.FieldDescriptorProto
    scalars = {"int32": F.TYPE_INT32, "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32,
               "bool": F.TYPE_BOOL, "float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE,
               "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES}
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"minivgg_caffe_subset_{int(float_data_as_bytes)}.proto", package="caffe",
        syntax="proto2")
    for enum, values in ENUMS.items():
        e = proto.enum_type.add(name=enum)
        for value_name, number in values:
            e.value.add(name=value_name, number=number)
    for message, fields in SCHEMA.items():
        m = proto.message_type.add(name=message)
        for name, number, kind, label, *default in fields:
            if not float_data_as_bytes and (message, name) in (("BlobProto", "data"),
                                                               ("BlobProto", "double_data")):
                kind, label = ("float" if name == "data" else "double"), "packed"
            f = m.field.add(name=name, number=number)
            f.label = F.LABEL_REPEATED if label in ("repeated", "packed") else F.LABEL_OPTIONAL
            if label == "packed":
                f.options.packed = True
            if kind in scalars:
                f.type = scalars[kind]
            else:
                f.type = F.TYPE_ENUM if kind in ENUMS else F.TYPE_MESSAGE
                f.type_name = f".caffe.{kind}"
            if default:
                f.default_value = default[0]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
               for name in SCHEMA}
    _schema_cache[float_data_as_bytes] = classes
    return classes


# ----------------------------------------------------------------------------------------
# Reading the messages
# ----------------------------------------------------------------------------------------

def read_net(path):
    """The binary `NetParameter` of a `.caffemodel`, or a one-line error for anything else."""
    net = build_schema()["NetParameter"]()  # first: it says how to install protobuf
    from google.protobuf.message import DecodeError
    with open(path, "rb") as f:
        data = f.read()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a Caffe .caffemodel, or a truncated one (protobuf: "
                         f"{e})") from e
    if not net.layer and not net.layers:
        raise ValueError(f"{path}: not a Caffe .caffemodel (no layers in it), nor a "
                         "safetensors, .pth or .npz file")
    return net


def read_prototxt(path):
    """The text `NetParameter` of a `deploy.prototxt` (fields outside `SCHEMA` are skipped)."""
    net = build_schema()["NetParameter"]()
    from google.protobuf import text_format
    try:
        with open(path, encoding="utf-8") as f:
            text_format.Parse(f.read(), net, allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a Caffe prototxt ({e})") from e
    return net


# A layer as the rest of this file sees it, whichever format it came from.
Layer = namedtuple("Layer", "name kind param blobs")

# Layer types that hold no weights and do not change the shapes a VGG computes.
_PASSIVE = {"RELU", "DROPOUT", "SOFTMAX", "SOFTMAX_LOSS", "ACCURACY", "DATA", "IMAGE_DATA",
            "MEMORY_DATA", "WINDOW_DATA", "HDF5_DATA", "DUMMY_DATA", "SPLIT", "SILENCE",
            "FLATTEN", "INPUT"}
_KINDS = {"CONVOLUTION": "conv", "POOLING": "pool", "INNER_PRODUCT": "fc", "LRN": "lrn"}
# New-format type strings -> V1 enum names ("InnerProduct" -> "INNER_PRODUCT").
_NEW_TYPES = {"Convolution": "CONVOLUTION", "Pooling": "POOLING", "InnerProduct":
              "INNER_PRODUCT", "LRN": "LRN", "ReLU": "RELU", "Dropout": "DROPOUT",
              "Softmax": "SOFTMAX", "SoftmaxWithLoss": "SOFTMAX_LOSS", "Accuracy": "ACCURACY",
              "Data": "DATA", "ImageData": "IMAGE_DATA", "MemoryData": "MEMORY_DATA",
              "WindowData": "WINDOW_DATA", "HDF5Data": "HDF5_DATA", "DummyData": "DUMMY_DATA",
              "Split": "SPLIT", "Silence": "SILENCE", "Flatten": "FLATTEN", "Input": "INPUT"}


def net_layers(net, where):
    """[Layer] of a NetParameter in either format, weights as NumPy arrays, passive ones out."""
    if net.layer and net.layers:
        raise ValueError(f"{where}: holds both 'layer' and 'layers' (old and new format)")
    v1_names = {number: name for name, number in V1_LAYER_TYPES}
    out = []
    for layer in net.layers or net.layer:
        if net.layers:
            kind = v1_names.get(layer.type, f"type {layer.type}")
        else:
            kind = _NEW_TYPES.get(layer.type, layer.type)
        if kind in _PASSIVE:
            continue
        if kind not in _KINDS:
            raise ValueError(f"{where}: layer {layer.name!r} of type {kind} is not part of a "
                             "VGG (convolutions, max-pools, LRN, inner products, ReLU, "
                             "dropout, soft-max)")
        kind = _KINDS[kind]
        param = {"conv": layer.convolution_param, "pool": layer.pooling_param,
                 "fc": layer.inner_product_param, "lrn": layer.lrn_param}[kind]
        blobs = [_blob_array(b, f"{where}: layer {layer.name!r}") for b in layer.blobs]
        out.append(Layer(layer.name, kind, param, blobs))
    return out


def _blob_array(blob, where):
    """A BlobProto's values as a float32 array in its stated shape (legacy 4-D or `shape`)."""
    if blob.data:
        values = np.frombuffer(blob.data, dtype="<f4")
        nbytes = len(blob.data)
    else:
        values = np.frombuffer(blob.double_data, dtype="<f8").astype(np.float32)
        nbytes = len(blob.double_data)
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
    if nbytes % values.itemsize or values.size != int(np.prod(shape)):
        raise ValueError(f"{where}: a blob of shape {shape} holds {nbytes} bytes of values "
                         f"({values.size} numbers); the file is damaged or not packed")
    return values.reshape(shape)


# ----------------------------------------------------------------------------------------
# Layers -> a Table 1 column
# ----------------------------------------------------------------------------------------

def _one(values, default, name, where):
    """A repeated size field (pad, kernel_size, stride) that must hold one square value."""
    values = list(values)
    if len(set(values)) > 1:
        raise ValueError(f"{where}: non-square {name} {values} is not part of a VGG")
    return values[0] if values else default


def _check_conv(layer, where):
    """Kernel size of a VGG convolution (3 or 1, stride 1, 'same' padding, one group)."""
    p = layer.param
    k = _one(p.kernel_size, p.kernel_h, "kernel_size", where)
    pad = _one(p.pad, p.pad_h, "pad", where)
    stride = _one(p.stride, p.stride_h or 1, "stride", where)
    if (p.kernel_w or k) != k or (p.pad_w or pad) != pad or (p.stride_w or stride) != stride:
        raise ValueError(f"{where}: non-square kernel, pad or stride is not part of a VGG")
    if k not in (1, 3) or stride != 1 or pad != k // 2 or p.group != 1 or any(
            d != 1 for d in p.dilation):
        raise ValueError(f"{where}: a {k}×{k} convolution with stride {stride}, pad {pad}, "
                         f"group {p.group} is not a Table 1 conv (3×3 or 1×1, stride 1, "
                         "size-preserving padding)")
    return k


def _check_pool(layer, where):
    p = layer.param
    k, stride = p.kernel_size or p.kernel_h, p.stride_h or p.stride
    if p.pool != 0 or k != 2 or stride != 2 or p.pad or p.pad_h or p.global_pooling:
        raise ValueError(f"{where}: pooling (method {p.pool}, kernel {k}, stride {stride}, "
                         f"pad {p.pad}) is not the 2×2 max-pool with stride 2 of Sec. 2.1")


def table1_structure(layers, where):
    """The column of Table 1 the layers form -> (config, convs, lrns, fcs).

    Five blocks of convolutions (and LRN) each closed by a max-pool, then three inner
    products; the kernel sizes and LRN positions pick the column (D and E differ in the
    number of convs in blocks 3-5, C has 1×1 convs, A-LRN an LRN in block 1).
    """
    blocks, current, convs, lrns, fcs = [], [], [], [], []
    for layer in layers:
        here = f"{where}: layer {layer.name!r}"
        if layer.kind in ("conv", "lrn") and (fcs or len(blocks) == 5):
            raise ValueError(f"{here}: a {layer.kind} after the five pools, where a VGG has "
                             "only its three fully-connected layers")
        if layer.kind == "conv":
            current.append(f"conv{_check_conv(layer, here)}")
            convs.append(layer)
        elif layer.kind == "lrn":
            current.append("LRN")
            lrns.append(layer)
        elif layer.kind == "pool":
            _check_pool(layer, here)
            blocks.append(current)
            current = []
        else:
            if len(blocks) != 5:
                raise ValueError(f"{here}: an inner product after {len(blocks)} max-pools; "
                                 "a VGG has five before fc6")
            fcs.append(layer)
    if len(blocks) != 5 or current or len(fcs) != 3:
        raise ValueError(f"{where}: {len(blocks)} max-pools and {len(fcs)} inner products "
                         "(with convs after the last pool: " + ("yes" if current else "no")
                         + "); every VGG has five blocks, each closed by a max-pool, then "
                         "three fully-connected layers")
    for config, table in CONFIGS.items():
        kinds = [[s if s == "LRN" else f"conv{parse_layer(s)[1]}" for s in block]
                 for block in table]
        if kinds == blocks:
            return config, convs, lrns, fcs
    raise ValueError(f"{where}: blocks {blocks} fit no column of Table 1 "
                     f"({', '.join(CONFIGS)})")


def _weights(layer, out_shape, where):
    """(weight, bias) of a conv or fc layer, reshaped from Caffe's blob shapes."""
    if len(layer.blobs) != 2:
        raise ValueError(f"{where}: layer {layer.name!r} has {len(layer.blobs)} blobs, not a "
                         "weight and a bias (bias_term: false is not part of a VGG)")
    W, b = layer.blobs
    n = layer.param.num_output or b.size
    if b.size != n or W.size % n:
        raise ValueError(f"{where}: layer {layer.name!r} has num_output {n} but blobs of "
                         f"shapes {W.shape} and {b.shape}")
    if layer.kind == "fc" and layer.param.transpose:
        W = W.reshape(-1, n).T  # stored (in, out) when transpose: true
    return W.reshape((n,) + out_shape(W.size // n)), b.reshape(n)


def to_minivgg_arrays(config, convs, fcs, where):
    """{minivgg name: array}: conv{b}_{j} by position in their blocks, fc6-fc8 as matrices."""
    names = [f"conv{b}_{j}" for b, block in enumerate(CONFIGS[config], start=1)
             for j in range(1, 1 + sum(spec != "LRN" for spec in block))]
    arrays = {}
    for name, layer in zip(names, convs):
        k = _check_conv(layer, where)
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = _weights(
            layer, lambda m, k=k: (m // (k * k), k, k), where)
    for name, layer in zip(("fc6", "fc7", "fc8"), fcs):
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = _weights(layer, lambda m: (m,),
                                                                    where)
    return arrays


def load_caffe_vgg(caffemodel, prototxt=None, config=None, dtype=np.float32, device="cpu"):
    """A minivgg `VGG` holding a Caffe release's weights (D for the 16-layer file, E for 19).

        model = load_caffe_vgg("VGG_ILSVRC_16_layers.caffemodel")
        logits = model(x)   # x: RGB, 0-255 minus model.pretrained_meta["mean_rgb"]

    The column of Table 1 comes from the layer list (of `prototxt` when given, whose
    layers take their blobs from the .caffemodel by name, as Caffe's own
    `CopyTrainedLayersFrom` does); the widths from the blob shapes. `config`, when given,
    must agree. Raises `ValueError` with one line for anything that is not such a file.
    """
    where = os.fspath(caffemodel)
    net = read_net(where)
    layers = net_layers(net, where)
    if prototxt is not None:
        by_name = {layer.name: layer for layer in layers}
        described = net_layers(read_prototxt(prototxt), os.fspath(prototxt))
        missing = [layer.name for layer in described if layer.name not in by_name]
        if missing:
            raise ValueError(f"{where}: has no weights for the prototxt's layers {missing}")
        layers = [layer._replace(blobs=by_name[layer.name].blobs) for layer in described]
    name, convs, lrns, fcs = table1_structure(layers, where)
    if config is not None and canonical_config(config) != name:
        raise ValueError(f"{where}: the file holds configuration {name}, not "
                         f"{canonical_config(config)}")
    arrays = to_minivgg_arrays(name, convs, fcs, where)
    first = arrays["conv1_1.weight"]
    if first.shape[1] != 3:
        raise ValueError(f"{where}: conv1_1 takes {first.shape[1]} input channels, not 3")
    # NOTE: Caffe's conv1_1 filters see B, G, R; reversing their input channels makes the
    # same net see R, G, B (and the mean pixel is reversed with them in CAFFE_INPUT).
    arrays["conv1_1.weight"] = np.ascontiguousarray(first[:, ::-1])
    model = build_model(name, arrays, where, dtype)
    for layer in lrns:  # A-LRN: Caffe's LRN divides alpha by the window size, k default 1
        p = layer.param
        model.norm1 = nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k,
                                           alpha_over_n=True)
    model.ceil_mode = True
    model.pretrained_meta = dict(CAFFE_INPUT, layout="caffe", pool_ceil_mode=True,
                                 caffe_format="layers (V1)" if net.layers else "layer")
    return model.to(device) if device != "cpu" else model
