"""The paper's testing protocol (Sec. 3.2): dense, multi-crop, multi-scale, flips and fusion.

A trained net is applied to a test image rescaled isotropically so that its smallest side is
Q (the test scale, not necessarily the training scale S). Three ways to get class posteriors:

* centre crop: one crop of the training size from the middle of the image, no flip; the
  single-crop baseline that torchvision's reference script reports. "center-flip" averages
  it with its mirror image, the fair baseline beside dense and multi-crop, which both
  average over flips. (The paper reports neither: its Table 5 compares dense, multi-crop
  and both.)
* dense (Sec. 3.2): the fully-connected layers become convolutions (`to_fully_convolutional`),
  the net runs on the whole uncropped image, the class score map is averaged spatially, and
  the soft-max of the image is averaged with that of its horizontal flip. The score map's
  windows sit on a 32-pixel grid; `dense_crop` centres that grid on the image (see there).
* multi-crop: a 5×5 regular grid of training-size crops (`crop_grid`) × 2 flips = 50 crops per
  scale, soft-max averaged over the crops.

Multi-scale testing averages the soft-max over several Q (Table 4); "dense+multicrop" averages
the dense and the multi-crop soft-max (Table 5); fusion averages the soft-max of several
models (Sec. 4.4, Table 6). Every combination is an average of posteriors, so each helper
here returns an (N, K) array of soft-max probabilities and `average` combines them.

Images enter as uint8 arrays (H, W, 3) in RGB order, as `minivgg.images.load_rgb`
returns them.
Shape legend: N images, K classes, Q test scale, c training crop size.
"""

import contextlib
import time
import warnings
from collections import OrderedDict, namedtuple

import numpy as np

from minivgg import backend
from minivgg import functional as F
from minivgg import nn
from minivgg.images import check_rescale, check_scale
from minivgg.metrics import topk_errors
from minivgg.models import pooled_size
from minivgg.tensor import Tensor, no_grad

BASE_METHODS = ("center", "center-flip", "dense", "multicrop")
PROTOCOLS = ("center", "center-flip", "dense", "multicrop", "dense+multicrop")
GRID = 5  # the paper's 5×5 crop grid (Sec. 3.2)
DENSE_ALIGNS = ("center", "top-left")  # where dense evaluation's window grid sits


# ----------------------------------------------------------------------------------------
# Fully-convolutional conversion (Sec. 3.2)
# ----------------------------------------------------------------------------------------

class FullyConvolutionalVGG(nn.Sequential):
    """A VGG whose fc6/fc7/fc8 are convolutions: (N, 3, H, W) -> score map (N, K, h, w).

    With p = pooled_size(c), h = H//32 - p + 1 and w = W//32 - p + 1 (five floor-mode
    2×2 pools, then fc6 as a p×p valid convolution), so a training-size image gives a 1×1
    map and needs H, W >= c. In ceil mode h = ceil(H/32) - p + 1 (`score_map_size`).
    """

    def forward(self, x):
        check_image_size(x.shape[2], x.shape[3], self.input_size)
        return super().forward(x)


def to_fully_convolutional(model):
    """The fully-convolutional twin of a trained VGG (Sec. 3.2), weights reshaped, not retrained.

    The conv, ReLU, LRN and pool layers are shared with `model` (the same objects, so the
    two nets always hold the same weights). fc6 (out, C*p*p) becomes a p×p convolution with
    p = pooled_size(model.input_size) (7 at 224, 2 at 64); fc7 and fc8 become 1×1
    convolutions. Dropout is left out: at test time it is the identity.

    NOTE: `Flatten` turns pool5's (N, C, p, p) output into features ordered (C, H, W), the
    same order as a conv weight's (C, KH, KW) axes, so fc6's weight is a plain reshape to
    (out, C, p, p). Any other order (e.g. HWC) would silently scramble the filters.
    """
    p = pooled_size(model.input_size, ceil_mode=getattr(model, "ceil_mode", False))
    layers = OrderedDict()
    for name, layer in model.named_children():
        if name == "flatten":
            break
        layers[name] = layer
    else:
        raise ValueError("to_fully_convolutional: expected a VGG with a 'flatten' layer")
    fc6, fc7, fc8 = model.fc6, model.fc7, model.fc8
    channels = fc6.in_features // (p * p)
    if channels * p * p != fc6.in_features:
        raise ValueError(f"to_fully_convolutional: fc6 has {fc6.in_features} inputs, not a "
                         f"multiple of the {p}x{p} pool5 map of input size "
                         f"{model.input_size}")
    layers["fc6"] = _linear_as_conv(fc6, channels, p)
    layers["relu6"] = nn.ReLU()
    layers["fc7"] = _linear_as_conv(fc7, fc7.in_features, 1)
    layers["relu7"] = nn.ReLU()
    layers["fc8"] = _linear_as_conv(fc8, fc8.in_features, 1)
    fcn = FullyConvolutionalVGG(layers)
    for attr in ("config", "input_size", "width", "fc_width", "num_classes", "ceil_mode"):
        setattr(fcn, attr, getattr(model, attr))
    return fcn.eval()


def _linear_as_conv(linear, in_channels, k):
    """Linear (out, in_channels*k*k) -> Conv2d(in_channels, out, k), weights reshaped."""
    W = linear.weight.data
    conv = nn.Conv2d(in_channels, linear.out_features, k, stride=1, padding=0, dtype=W.dtype)
    conv.weight.data = W.reshape(linear.out_features, in_channels, k, k)
    if linear.bias is not None:
        conv.bias.data = linear.bias.data
    else:
        conv.bias = None
    return conv


def score_map_size(height, width, input_size, ceil_mode=False):
    """(h, w) of the class score map of an H×W image, for a net trained on c×c crops.

    E.g. c = 64 (p = 2): a 72×72 image gives 1×1 in floor mode (72 -> 2 after the pools)
    and 2×2 in ceil mode (72 -> 3); a 96×128 image gives 2×3 in either.
    """
    p = pooled_size(input_size, ceil_mode=ceil_mode)
    return (pooled_size(height, ceil_mode=ceil_mode) - p + 1,
            pooled_size(width, ceil_mode=ceil_mode) - p + 1)


def check_image_size(height, width, crop):
    """A clear error for an image smaller than the training crop (dense or multi-crop)."""
    if height < crop or width < crop:
        raise ValueError(f"image of {height}x{width} pixels is smaller than the {crop}x{crop} "
                         f"training crop; use a test scale Q >= {crop}")


# ----------------------------------------------------------------------------------------
# Crop positions
# ----------------------------------------------------------------------------------------

def grid_offsets(size, crop, n=GRID):
    """n crop offsets along one side: evenly spaced from 0 to size - crop, both included.

    Offset i is round(i * (size - crop) / (n - 1)), rounding halves up, so the first crop
    touches one edge, the last the other, and neighbours are (size - crop)/(n - 1) apart to
    within half a pixel. When size == crop all n offsets are 0.
    """
    if size < crop:
        raise ValueError(f"image side of {size} pixels is smaller than the {crop}-pixel "
                         f"training crop; use a test scale Q >= {crop}")
    if n < 2:
        raise ValueError(f"grid_offsets: need n >= 2 crops per side, got {n}")
    span = size - crop
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def crop_grid(height, width, crop, n=GRID):
    """(top, left) of the n×n crops (Sec. 3.2: 5×5), row by row, corner to corner."""
    check_image_size(height, width, crop)
    return [(top, left) for top in grid_offsets(height, crop, n)
            for left in grid_offsets(width, crop, n)]


def center_offset(height, width, crop):
    """(top, left) of the centre crop; odd leftovers go to the bottom and right."""
    check_image_size(height, width, crop)
    return (height - crop) // 2, (width - crop) // 2


# ----------------------------------------------------------------------------------------
# Posteriors of one model for a list of images at one scale
# ----------------------------------------------------------------------------------------

def _forward(net, batch):
    """Run `net` on a host float array batch on the net's device; host array out."""
    device = net.parameters()[0].device
    with no_grad():
        return backend.to_numpy(net(Tensor(backend.to_device(batch, device))).data)


def _softmax_in_batches(net, crops, count, batch_size):
    """Soft-max of `net` on `count` crops, built `batch_size` at a time -> (count, K).

    `crops` yields (3, c, c) arrays; only one batch of them is in memory at once (50 crops
    of 224 pixels per image and scale would otherwise be 30 MB an image).
    """
    out, batch = [], []
    for crop in crops:
        batch.append(crop)
        if len(batch) == batch_size:
            out.append(F.softmax(_forward(net, np.stack(batch)).astype(np.float64)))
            batch = []
    if batch:
        out.append(F.softmax(_forward(net, np.stack(batch)).astype(np.float64)))
    probs = np.concatenate(out)
    assert len(probs) == count, (len(probs), count)
    return probs


def center_posteriors(model, images, batch_size=64, flip=False):
    """Single centre crop -> (N, K); with `flip`, averaged with the crop's mirror image.

    images: list of (3, H, W) float arrays. Without the flip this is the usual single-crop
    baseline; with it, it is the baseline to set beside dense and multi-crop, which both
    average over flips (the flip alone is worth about a point on Imagenette).
    """
    c, per_image = model.input_size, 2 if flip else 1

    def crops():
        for x in images:
            top, left = center_offset(x.shape[1], x.shape[2], c)
            crop = x[:, top:top + c, left:left + c]
            yield crop
            if flip:
                yield crop[:, :, ::-1]

    probs = _softmax_in_batches(model, crops(), per_image * len(images), batch_size)
    return probs.reshape(len(images), per_image, -1).mean(axis=1)


def multicrop_posteriors(model, images, batch_size=64, n=GRID):
    """n×n grid crops × 2 flips per image (Sec. 3.2), soft-max averaged -> (N, K).

    The crops of `crop_grid` come row by row, each followed by its mirror image.

    NOTE: each crop is zero-padded at its own borders by the convolutions, while dense
    evaluation sees the real neighbouring pixels there; this is why the paper finds the
    two complementary (Sec. 3.2).
    """
    c, per_image = model.input_size, 2 * n * n
    for x in images:  # fail before any work is done
        check_image_size(x.shape[1], x.shape[2], c)

    def crops():
        for x in images:
            for top, left in crop_grid(x.shape[1], x.shape[2], c, n):
                crop = x[:, top:top + c, left:left + c]
                yield crop
                yield crop[:, :, ::-1]

    probs = _softmax_in_batches(model, crops(), per_image * len(images), batch_size)
    return probs.reshape(len(images), per_image, -1).mean(axis=1)


def dense_crop(x, stride=32, align="center", ceil_mode=False):
    """The part of a (3, H, W) image that dense evaluation's window grid covers.

    Five floor-mode 2×2 pools put the score map's windows on a `stride` = 32-pixel grid
    that starts at the top-left corner and covers the first H - H % 32 rows and W - W % 32
    columns; the last H % 32 rows and W % 32 columns fall in no window (they reach the
    scores only through the 3×3 convs' context). align="center" drops (H % 32) // 2 rows
    and (W % 32) // 2 columns at the top-left and the rest at the bottom-right, so the
    grid sits in the middle of the image, as the centre crop does; "top-left" keeps the
    image whole (the grid in the corner, where the plain fully-convolutional net puts it).
    In ceil mode the pools' partial windows cover every pixel: the image is kept whole.

    NOTE: at Q = 72 a 64-pixel net has one window: top-left it sees rows 0..63 (8 pixels
    off-centre) and never the bottom 8 rows; centred it sees rows 4..67, like the centre
    crop. Because the leftover rows are cut off, not just left out of the windows, their
    context goes too: with a 1×1 score map centred dense evaluation *is* the centre crop +
    flip (to rounding; tests/test_evaluate.py checks it), and the real-neighbour context
    that the paper credits dense evaluation with (Sec. 3.2) only appears on larger maps.
    """
    if ceil_mode or align == "top-left":
        return x
    if align != "center":
        raise ValueError(f"unknown dense alignment {align!r}; expected one of "
                         f"{', '.join(DENSE_ALIGNS)}")
    H, W = x.shape[1], x.shape[2]
    top, left = (H % stride) // 2, (W % stride) // 2
    return x[:, top:top + H - H % stride, left:left + W - W % stride]


def dense_posteriors(fcn, images, batch_size=64, align="center"):
    """Dense evaluation (Sec. 3.2) with the fully-convolutional net -> (N, K).

    Each image and its horizontal flip go through `fcn`, each cut by `dense_crop(align)` so
    that the 32-pixel window grid is centred on it; the score map (K, h, w) is averaged
    over space into one score vector, turned into a soft-max, and the two soft-max vectors
    are averaged. Images of the same size are batched together; a large image may get a
    batch of its own.

    NOTE: the paper averages the *scores* over space ("spatially averaged (sum-pooled)") and
    only then takes the soft-max, which it averages over the flips. Averaging per-location
    soft-max instead gives different numbers on maps larger than 1×1.

    NOTE: neighbouring score-map locations are 32 pixels apart (five 2×2 pools), so with a
    small net the map is tiny: a 64-pixel net sees a Q×Q image (Imagenette-224 is square)
    as a 1×1 map for Q = 64..95, i.e. one 64-pixel window, where multi-crop uses 25
    positions; 96..127 gives 2×2. With align="top-left" that one window sits in the
    top-left corner of the image (and top-right of the flip); centred, it sits in the
    middle of both. The paper's scales (256, 384, 512 for 224-pixel crops) are multiples
    of 32, where the two alignments agree.
    """
    out = np.empty((len(images), fcn.num_classes))
    by_shape = OrderedDict()
    ceil_mode = getattr(fcn, "ceil_mode", False)
    for i, x in enumerate(images):
        by_shape.setdefault(x.shape, []).append(i)
    for shape, indices in by_shape.items():
        check_image_size(shape[1], shape[2], fcn.input_size)
        crop = (lambda v: dense_crop(v, align=align, ceil_mode=ceil_mode))
        # Two copies (image, flip) per image; as many as hold about `batch_size` crops'
        # worth of pixels, so memory stays bounded at large Q.
        crops_per_image = 2 * shape[1] * shape[2] / fcn.input_size ** 2
        step = max(1, int(batch_size // crops_per_image))
        for s in range(0, len(indices), step):
            idx = indices[s:s + step]
            # NOTE: the flip is cut on its own, so with an odd leftover each view drops
            # the larger half on its own right: between them both edges are seen.
            batch = np.stack([crop(v) for i in idx for v in (images[i], images[i][:, :, ::-1])])
            scores = _forward(fcn, np.ascontiguousarray(batch)).mean(axis=(2, 3))
            probs = F.softmax(scores.astype(np.float64))
            out[idx] = probs.reshape(len(idx), 2, -1).mean(axis=1)
    return out


# ----------------------------------------------------------------------------------------
# Combining posteriors: multi-scale, dense+multi-crop, model fusion
# ----------------------------------------------------------------------------------------

def average(posteriors):
    """Mean of several (N, K) soft-max arrays: the paper's one way to combine (Sec. 3.2, 4.4).

    Used over test scales (multi-scale, Table 4), over dense and multi-crop (Table 5) and over
    models (fusion, Table 6). Each input rows sum to 1, so the output rows do too.
    """
    posteriors = [np.asarray(p, dtype=np.float64) for p in posteriors]
    if not posteriors:
        raise ValueError("average: nothing to average")
    shapes = {p.shape for p in posteriors}
    if len(shapes) != 1:
        raise ValueError(f"average: posteriors have different shapes {sorted(shapes)}")
    return np.mean(posteriors, axis=0)


def parse_protocol(protocol):
    """'dense+multicrop' -> ('dense', 'multicrop'); a clear error for anything else."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of "
                         f"{', '.join(PROTOCOLS)}")
    return tuple(protocol.split("+"))


def combine(parts, protocol, scales):
    """Posteriors of one protocol at the scales `scales` from precomputed parts.

    parts[(method, Q)] is an (N, K) soft-max array. Multi-scale averages over Q; then
    'dense+multicrop' averages its two methods (each already averaged over Q), as Table 5's
    "dense + multi-crop" rows combine the two protocols' outputs.
    """
    methods = parse_protocol(protocol)
    return average([average([parts[(m, q)] for q in scales]) for m in methods])


# ----------------------------------------------------------------------------------------
# One model at test time
# ----------------------------------------------------------------------------------------

class EvalNet:
    """A trained model with what testing needs: its FC-as-conv twin and its input recipe.

    `to_input(img)` turns a rescaled uint8 (H, W, 3) RGB image into the float (3, H, W)
    array the model was trained on (mean subtraction, layout); the caller builds it from
    `minivgg.images` and the checkpoint's statistics. `posteriors(images, method)` then
    returns the (N, K) soft-max array of one method at one scale.
    """

    def __init__(self, model, to_input=None, classes=None, name=None, batch_size=64,
                 dense_align="center"):
        self.model = model.eval()
        self.to_input = to_input
        self.fcn = to_fully_convolutional(model)
        self.classes = list(classes) if classes is not None else None
        self.name = name or model.config
        self.batch_size = batch_size
        if dense_align not in DENSE_ALIGNS:
            raise ValueError(f"unknown dense alignment {dense_align!r}; expected one of "
                             f"{', '.join(DENSE_ALIGNS)}")
        self.dense_align = dense_align

    @property
    def input_size(self):
        return self.model.input_size

    def warm_up(self, methods):
        """Run each method once on a blank image, so compile time is never timed."""
        blank = np.zeros((3, self.input_size, self.input_size),
                         dtype=self.model.parameters()[0].dtype)
        for method in methods:
            self.posteriors([blank], method)

    def posteriors(self, images, method):
        """images: list of (3, H, W) float arrays at one scale -> (N, K) soft-max."""
        if method in ("center", "center-flip"):
            return center_posteriors(self.model, images, self.batch_size,
                                     flip=method == "center-flip")
        if method == "dense":
            return dense_posteriors(self.fcn, images, self.batch_size, self.dense_align)
        if method == "multicrop":
            return multicrop_posteriors(self.model, images, self.batch_size)
        raise ValueError(f"unknown method {method!r}; expected one of "
                         f"{', '.join(BASE_METHODS)}")


def check_same_classes(class_lists, names):
    """Fusion needs every model to predict the same classes in the same order."""
    first = list(class_lists[0])
    for classes, name in zip(class_lists[1:], names[1:]):
        if list(classes) != first:
            only_first = sorted(set(first) - set(classes))
            only_this = sorted(set(classes) - set(first))
            detail = (f"only in {names[0]}: {only_first[:5]}, only in {name}: {only_this[:5]}"
                      if only_first or only_this else "same classes in a different order")
            raise ValueError(f"cannot fuse models with different class sets ({detail})")
    return first


# ----------------------------------------------------------------------------------------
# A whole test set: every (protocol, scales) row of a results table in one pass
# ----------------------------------------------------------------------------------------

def evaluate_images(nets, load, items, rows, rescale, chunk_size=32, progress=None):
    """Top-1/top-5 errors of `nets` (fused when several) for every row, in one pass.

    nets: EvalNets with a `to_input(uint8 (H, W, 3)) -> float (3, H, W)` callable (mean
    subtraction and layout, as in training). load(path) -> uint8 RGB image.
    items: [(path, label)]. rows: [(protocol, scales)], e.g. [("dense", (72,)),
    ("dense+multicrop", (64, 72, 80))]. rescale(img, Q) -> image with smallest side Q.

    Each image is decoded once and rescaled once per Q; each (model, method, Q) part is
    computed once and shared by every row that uses it, so a multi-scale row costs no more
    than its single-scale rows together. A row's images/s counts the seconds of the stages it
    uses (decoding, rescaling, networks), measured in this run.
    An image that `load` cannot read (OSError) is skipped with a warning and counted.
    Returns one dict per row: protocol, scales, images, skipped, top1_err and top5_err (in %),
    seconds, images_per_s.
    """
    rows = check_rows(nets, rows)
    needed = sorted({(m, q) for p, scales in rows for m in parse_protocol(p) for q in scales})
    for net in nets:  # NOTE: the first call JIT-compiles kernels; keep it out of images/s
        net.warm_up(sorted({m for m, _ in needed}))
    clock = Stopwatch()
    misses = [{1: 0, 5: 0} for _ in rows]
    done = skipped = 0
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        with clock(Stage("decode")):
            images, labels = decode(load, chunk, max(q for _, q in needed))
        skipped += len(chunk) - len(images)
        if not images:
            continue
        parts = chunk_posteriors(nets, images, needed, rescale, clock)
        for r, (protocol, scales) in enumerate(rows):
            probs = average([combine(p, protocol, scales) for p in parts])
            for k, n in topk_errors(probs, labels, ks=(1, 5)).items():
                misses[r][k] += n
        done += len(images)
        if progress is not None:
            progress(start + len(chunk), len(items))
    results = []
    for (protocol, scales), miss in zip(rows, misses):
        spent = clock.total(row_stages(protocol, scales, len(nets)))
        results.append(dict(protocol=protocol, scales=scales, images=done, skipped=skipped,
                            top1_err=100.0 * miss[1] / max(done, 1),
                            top5_err=100.0 * miss[5] / max(done, 1),
                            seconds=spent, images_per_s=done / spent if spent else float("nan")))
    return results


def check_rows(nets, rows):
    """Rows as (protocol, tuple of int Q), each protocol known and every Q >= every crop."""
    rows = [(p, tuple(int(q) for q in scales)) for p, scales in rows]
    for protocol, scales in rows:
        parse_protocol(protocol)
        if not scales:
            raise ValueError(f"protocol {protocol!r}: no test scales given")
        check_scale(max(scales), "test scale Q")
        for net in nets:
            if min(scales) < net.input_size:
                raise ValueError(f"test scale Q={min(scales)} is smaller than the "
                                 f"{net.input_size}x{net.input_size} training crop of "
                                 f"{net.name}; every Q must be >= {net.input_size}")
    return rows


def decode(load, chunk, largest_q=None):
    """Images and int64 labels of the readable [(path, label)] in `chunk`; an image that
    would be over the size budget at the largest test scale `largest_q` (a very thin one)
    is skipped like an unreadable one, before anything is rescaled."""
    images, labels = [], []
    for path, label in chunk:
        try:
            img = load(path)
            if largest_q is not None:
                check_rescale(*img.shape[:2], largest_q, path)
            images.append(img)
            labels.append(label)
        except OSError as e:  # an unreadable file is counted, not fatal
            warnings.warn(f"skipping unreadable image {path}: {e}")
    return images, np.array(labels, dtype=np.int64)


def chunk_posteriors(nets, images, needed, rescale, clock):
    """parts[i][(method, Q)]: net i's (N, K) soft-max of `images` for each (method, Q) needed.

    Each Q's rescaled images are shared by the nets, each net's inputs by its methods.
    """
    parts = [dict() for _ in nets]
    for q in sorted({q for _, q in needed}):
        with clock(Stage("rescale", q)):
            rescaled = [rescale(img, q) for img in images]
        for i, net in enumerate(nets):
            with clock(Stage("input", q, i)):
                inputs = [net.to_input(img) for img in rescaled]
            for method in [m for m, mq in needed if mq == q]:
                with clock(Stage(method, q, i)):
                    parts[i][(method, q)] = net.posteriors(inputs, method)
    return parts


# ----------------------------------------------------------------------------------------
# Timing: seconds per stage, so each row can count the stages it uses
# ----------------------------------------------------------------------------------------

Stage = namedtuple("Stage", "step q net", defaults=(None, None))
Stage.__doc__ = """One timed stage of `evaluate_images`: step is "decode", "rescale",
"input" or a method; q the test scale; net the index of the model (None: shared by all)."""


class Stopwatch:
    """Seconds spent in each stage, added up over the chunks: `with clock(stage): ...`."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def total(self, stages):
        return sum(self.seconds.get(stage, 0.0) for stage in stages)


def row_stages(protocol, scales, num_nets):
    """The stages a row of the table uses: decoding, and per Q the rescale, each net's
    inputs and each net's methods."""
    stages = [Stage("decode")]
    for q in scales:
        stages.append(Stage("rescale", q))
        for i in range(num_nets):
            stages.append(Stage("input", q, i))
            stages += [Stage(method, q, i) for method in parse_protocol(protocol)]
    return stages
