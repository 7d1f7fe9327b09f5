"""VGG as a feature extractor for other tasks (App. B): one fixed vector per image.

    from minivgg import features
    X = features.extract(model, batch, layer="fc7")                  # (N, 3, c, c) in
    X = features.extract(model, images, layer="relu7", scales=(256, 384, 512), flip=True,
                         to_input=features.input_transform(model))   # uint8 images in

Two ways to get a feature vector:

* one crop (``scales=None``): `images` is an (N, 3, H, W) float array, already
  preprocessed (mean subtracted); the layer's output is flattened, so a conv or pool layer
  gives C*h*w numbers (fc layers need H = W = the model's input size).
* dense, App. B's way (``scales=(Q1, Q2, ...)``): `images` are uint8 (H, W, 3) RGB images
  of any size; each is rescaled so its smallest side is Q, turned into the net's input by
  `to_input`, and run through the fully-convolutional net of Sec. 3.2
  (`evaluate.to_fully_convolutional`: fc6 a p×p conv, fc7/fc8 1×1 convs). The layer's map
  (C, h, w) is global-average-pooled to C numbers, and the scales are averaged
  (``combine="mean"``, the paper's VOC features) or stacked (``"stack"``, Caltech).

``flip`` averages each vector with that of the mirrored image (App. B: "augmented with the
features of horizontally flipped images"; a one-crop conv or pool map is averaged with the
mirrored image's map as it comes, not mirrored back); ``normalize`` divides each vector by its
L2 norm, last (App. B's features go to a linear SVM L2-normalised).

Layer names are the model's own (`model.layer_names()`): "conv5_3", "pool5", "fc6",
"relu6", "fc7", "relu7", "fc8"... NOTE: "fc7" is the fc7 layer's output *before* its ReLU.
Caffe's "fc7" blob is after it (Caffe runs relu7 in place on that blob), so the paper's
"penultimate layer" features, extracted with Caffe, are minivgg's "relu7". Dropout layers
are the identity here (the model runs in eval mode).

Shape legend: N images, D feature length, C channels, Q test scale, c the training crop.
"""

from collections import OrderedDict

import numpy as np

from minivgg import backend
from minivgg.evaluate import check_image_size, dense_crop, to_fully_convolutional
from minivgg.tensor import Tensor, no_grad

COMBINES = ("mean", "stack")


def layer_names(model):
    """The names `extract` accepts, in network order."""
    return model.layer_names()


def check_layer(model, layer):
    """A clear error for a layer the model does not have, listing the valid names."""
    names = layer_names(model)
    if layer not in names:
        raise ValueError(f"no layer named {layer!r} in VGG-{model.config}; valid names: "
                         f"{', '.join(names)}")
    return layer


def input_transform(model):
    """uint8 (H, W, 3) RGB -> the float (3, H, W) input `model` expects, from its
    `pretrained_meta` (the mean RGB a checkpoint or a weight file records)."""
    from minivgg.pretrained import input_transform as transform
    meta = getattr(model, "pretrained_meta", None) or {}
    if meta.get("mean_rgb") is None:
        raise ValueError(f"VGG-{model.config} records no input preprocessing (no mean_rgb "
                         "in model.pretrained_meta); pass to_input=")
    return transform(meta)


def extract(model, images, layer="fc7", scales=None, flip=False, normalize=True,
            to_input=None, combine="mean", batch_size=32):
    """(N, D) float32 features of `images` at `layer`; see the module docstring.

    scales=None: images (N, 3, H, W) float, preprocessed. scales=(Q, ...): images a list of
    uint8 (H, W, 3) RGB arrays and `to_input` (default `input_transform(model)`) maps a
    rescaled image to the net's input. The model runs in eval mode (no dropout) without
    gradients; its training flag is restored afterwards.
    """
    check_layer(model, layer)
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; expected one of {', '.join(COMBINES)}")
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            if scales is None:
                feats = _single_crop(model, images, layer, flip, batch_size)
            else:
                feats = _dense(model, images, layer, _check_scales(scales), flip,
                               to_input or input_transform(model), combine, batch_size)
    finally:
        model.train(was_training)
    return l2_normalize(feats) if normalize else feats.astype(np.float32)


def l2_normalize(feats, eps=1e-12):
    """Each row divided by its L2 norm (an all-zero row stays zero), float32."""
    feats = np.asarray(feats, dtype=np.float64)
    norms = np.sqrt((feats * feats).sum(axis=1, keepdims=True))
    return (feats / np.maximum(norms, eps)).astype(np.float32)


def _check_scales(scales):
    scales = [scales] if np.isscalar(scales) else list(scales)
    if not scales or any(int(q) != q or q < 1 for q in scales):
        raise ValueError(f"scales must be positive integers (smallest image side Q), got "
                         f"{scales!r}")
    return [int(q) for q in scales]


def _device(model):
    return model.parameters()[0].device


def _run(net, layer, batch):
    """Host float batch -> host array of `layer`'s output (N, ...)."""
    x = Tensor(backend.to_device(np.ascontiguousarray(batch), _device(net)))
    return backend.to_numpy(net.activations(x, [layer])[layer].data)


def _single_crop(model, images, layer, flip, batch_size):
    """One crop per image: the layer's output flattened -> (N, D) float64."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype.kind != "f":
        raise ValueError(f"extract: expected a float array (N, 3, H, W) of preprocessed "
                         f"images without scales, got {images.dtype} {images.shape}; pass "
                         f"scales=(Q, ...) for uint8 images of any size")
    out = []
    for s in range(0, len(images), batch_size):
        batch = images[s:s + batch_size].astype(model.parameters()[0].dtype, copy=False)
        f = _run(model, layer, batch).reshape(len(batch), -1).astype(np.float64)
        if flip:
            f = (f + _run(model, layer, batch[:, :, :, ::-1])
                 .reshape(len(batch), -1)) / 2
        out.append(f)
    return np.concatenate(out) if out else np.zeros((0, 0))


def _dense_layer(layer):
    """The name of `layer` in the fully-convolutional net: dropout is the identity there,
    and flatten's features are pool5's map."""
    if layer.startswith("drop"):
        return "relu" + layer[4:]
    return "pool5" if layer == "flatten" else layer


def _dense(model, images, layer, scales, flip, to_input, combine, batch_size):
    """App. B: per scale, the global average of the layer's dense map -> (N, D) float64."""
    from minivgg.images import rescale_smallest_side
    fcn = to_fully_convolutional(model)
    name = _dense_layer(layer)
    past_convs = layer_names(fcn).index(name) >= layer_names(fcn).index("fc6")
    dtype = model.parameters()[0].dtype
    per_scale = []
    for q in scales:
        inputs = [to_input(rescale_smallest_side(np.asarray(img), q)) for img in images]
        # The centred 32-pixel window grid of dense evaluation (`evaluate.dense_crop`).
        inputs = [dense_crop(x, ceil_mode=model.ceil_mode).astype(dtype, copy=False)
                  for x in inputs]
        per_scale.append(_pooled_maps(fcn, name, inputs, flip, batch_size, past_convs))
    if not per_scale[0].size:
        return np.zeros((len(images), 0))
    return np.mean(per_scale, axis=0) if combine == "mean" else np.concatenate(per_scale, 1)


def _pooled_maps(fcn, name, inputs, flip, batch_size, past_convs):
    """Global-average-pooled maps of one scale, images of the same shape batched together."""
    by_shape = OrderedDict()
    for i, x in enumerate(inputs):
        by_shape.setdefault(x.shape, []).append(i)
    out = None
    for shape, indices in by_shape.items():
        if past_convs:  # fc6 as a p×p conv needs at least one p×p window of pool5
            check_image_size(shape[1], shape[2], fcn.input_size)
        # About `batch_size` training crops' worth of pixels per batch.
        step = max(1, int(batch_size * fcn.input_size ** 2 // (shape[1] * shape[2])))
        for s in range(0, len(indices), step):
            idx = indices[s:s + step]
            batch = np.stack([inputs[i] for i in idx])
            f = _run(fcn, name, batch).mean(axis=(2, 3)).astype(np.float64)
            if flip:
                f = (f + _run(fcn, name, batch[:, :, :, ::-1]).mean(axis=(2, 3))) / 2
            if out is None:
                out = np.zeros((len(inputs), f.shape[1]))
            out[idx] = f
    return out if out is not None else np.zeros((0, 0))
