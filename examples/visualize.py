"""PNG pictures of what a VGG holds and computes.

    python examples/visualize.py filters  --weights vgg16-397923af.pth --out filters.png
    python examples/visualize.py features cat.jpg --layer conv1_2 --weights ckpt.npz
    python examples/visualize.py scoremap cat.jpg --weights vgg16.npz --scale 384
    python examples/visualize.py curves   runs/a/metrics.csv --out curves.png

`--weights` takes a minivgg training checkpoint (`.npz` written by `minivgg.train`) or any
published weights `minivgg.pretrained.load_pretrained` reads (the authors' Caffe file,
timm's or torchvision's `.safetensors`, `.pth`, `.npz`). Without `--weights` the net is freshly
initialised (Sec. 3.1, N(0, 0.01)), which is useful only to see what "untrained" looks like.

* filters: conv1_1's 64 filters, each 3×3×3 shown as a tiny RGB image (Sec. 2.1);
* features: every channel of one layer's output for one image, as a grid of grey maps;
* scoremap: the class score map of dense evaluation (Sec. 3.2): fc6-fc8 become
  convolutions (`minivgg.evaluate.to_fully_convolutional`), the net runs on the whole image
  rescaled to smallest side Q, and each location of the map scores one 224-pixel window;
* curves: loss, error and learning rate per epoch from a `metrics.csv` of `minivgg.train`.

filters and features need only Pillow; scoremap and curves need matplotlib.
"""

import argparse
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import functional as F  # noqa: E402
from minivgg import checkpoint, models, no_grad, pretrained  # noqa: E402
from minivgg.run_state import require_finite  # noqa: E402
from minivgg.images import (check_scale, load_rgb, rescale_smallest_side,  # noqa: E402
                            to_chw_float32)
from minivgg.metrics import read_metrics  # noqa: E402
from minivgg.plots import import_pyplot, plot_curves, save_figure  # noqa: E402
from minivgg.pretrained import imagenet_classes  # noqa: E402

# ----------------------------------------------------------------------------------------
# Loading a model and preparing an image the way its weights expect
# ----------------------------------------------------------------------------------------

def load_weights(weights, config=None):
    """(model, normalise) where normalise maps uint8 (H, W, 3) -> float32 (3, H, W).

    `weights`: any file `minivgg.pretrained.load_pretrained` reads (a training checkpoint,
    the authors' Caffe file, torchvision's or timm's weights); `config` is checked against
    the file when given. None: a freshly initialised `config` net (D by default).
    NOTE: each kind of weights wants its own input scaling: torchvision's were trained on
    (x/255 - mean) / std, Caffe's and minivgg's on x - a mean RGB, 0-255 scale (Sec. 2.1);
    `pretrained.input_transform` applies the one the file's `pretrained_meta` names.
    Feeding one the other's input gives plausible-looking but wrong activations.
    """
    if weights is None:
        # Untrained: the FC layers are made narrow (256), since they change neither the
        # filters nor the feature maps and 120M random FC weights take long to draw.
        model = models.vgg(config or "D", fc_width=256, seed=0).eval()
        mean = pretrained.TORCHVISION_INPUT["mean_rgb"]  # ImageNet's mean pixel, 0-255
        return model, lambda img: to_chw_float32(img, mean)
    model = pretrained.load_pretrained(weights, config)
    require_finite(model, weights, "draw")
    return model, pretrained.input_transform(model.pretrained_meta)


# ----------------------------------------------------------------------------------------
# Image grids (Pillow only)
# ----------------------------------------------------------------------------------------

def tile(images, columns, pad=1, background=1.0):
    """(N, h, w) or (N, h, w, 3) floats in [0, 1] -> one grid image, `pad` pixels between."""
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    shape = (rows * (h + pad) + pad, columns * (w + pad) + pad) + images.shape[3:]
    grid = np.full(shape, background, dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid


def save_png(array, path, scale=1):
    """Floats in [0, 1], (H, W) or (H, W, 3), to a PNG enlarged `scale` times (nearest)."""
    from PIL import Image
    img = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    checkpoint.write_bytes(path, buffer.getvalue(), overwrite=True)
    return path


def normalise_each(maps):
    """Stretch every map (first axis) to [0, 1] on its own; a constant map becomes 0."""
    axes = tuple(range(1, maps.ndim))
    lo, hi = maps.min(axis=axes, keepdims=True), maps.max(axis=axes, keepdims=True)
    return (maps - lo) / np.where(hi > lo, hi - lo, 1.0)


def first_layer_filters(model):
    """conv1_1's weights (OC, 3, 3, 3) as OC RGB images (OC, 3, 3, 3) in [0, 1]."""
    W = model.conv1_1.weight.numpy()
    return normalise_each(W.transpose(0, 2, 3, 1))  # (OC, KH, KW, RGB)


def layer_output(model, x, layer):
    """The output of `layer` (e.g. 'conv3_1', 'relu3_1', 'pool3') for input (N, 3, H, W).

    Runs the layers in order and stops there, so only the prefix of the net is computed.
    """
    names = [name for name, _ in model.named_children()]
    if layer not in names or names.index(layer) >= names.index("flatten"):
        choices = ", ".join(n for n in names[:names.index("flatten")])
        raise ValueError(f"--layer {layer!r}: choose a convolutional-part layer: {choices}")
    with no_grad():
        for name, module in model.named_children():
            x = module(x)
            if name == layer:
                return x.numpy()


# ----------------------------------------------------------------------------------------
# Class score map (Sec. 3.2; matplotlib)
# ----------------------------------------------------------------------------------------

def class_score_map(model, x):
    """(K, h, w) class scores of the fully-convolutional net on one image (3, H, W)."""
    from minivgg.evaluate import to_fully_convolutional
    fcn = to_fully_convolutional(model)
    with no_grad():
        return fcn(x[None]).numpy()[0]


def plot_score_map(img, scores, class_names, path, top=3):
    """The image beside the score maps of its top classes, each on its own colour scale.

    The classes are ranked as the paper ranks them: scores averaged over the map (its
    "sum-pooling"), then the soft-max; that probability is printed above each map.
    """
    plt = import_pyplot()
    mean_scores = scores.mean(axis=(1, 2)).astype(np.float64)
    probs = F.softmax(mean_scores[None])[0]
    best = np.argsort(mean_scores)[::-1][:top]
    fig, axes = plt.subplots(1, top + 1, figsize=(3.2 * (top + 1), 3.6))
    axes[0].imshow(img)
    axes[0].set_title(f"input {img.shape[0]}x{img.shape[1]}", fontsize=9)
    for ax, k in zip(axes[1:], best):
        im = ax.imshow(scores[k], cmap="magma")
        ax.set_title(f"{class_names[k]}: p = {probs[k]:.3f}\nscore map "
                     f"{scores.shape[1]}x{scores.shape[2]}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Dense evaluation (Sec. 3.2): class scores at every location of the map")
    fig.tight_layout()
    save_figure(fig, path)
    return best


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def cmd_filters(args):
    model, _ = load_weights(args.weights, args.config)
    filters = first_layer_filters(model)
    print(f"conv1_1: {len(filters)} filters of shape {filters.shape[1:3]} x RGB")
    return save_png(tile(filters, columns=8), args.out, scale=12)


def last_conv_of_block_1(model):
    """conv1_2 in B-E, conv1_1 in A and A-LRN (Table 1: A has one conv in its first block)."""
    return [name for name, _ in model.named_children() if name.startswith("conv1_")][-1]


def cmd_features(args):
    img = rescale_smallest_side(load_rgb(args.image), args.scale, args.image)  # no wait
    model, normalise = load_weights(args.weights, args.config)
    layer = args.layer or last_conv_of_block_1(model)
    maps = layer_output(model, normalise(img)[None], layer)[0]  # (C, h, w)
    shown = maps[:args.max_channels]
    print(f"{layer}: output {maps.shape[0]}x{maps.shape[1]}x{maps.shape[2]}, "
          f"showing {len(shown)} channels")
    columns = int(np.ceil(np.sqrt(len(shown))))
    scale = max(1, 96 // maps.shape[1])
    return save_png(tile(normalise_each(shown), columns, pad=2), args.out, scale=scale)


def cmd_scoremap(args):
    img = rescale_smallest_side(load_rgb(args.image), args.scale, args.image)  # no wait
    model, normalise = load_weights(args.weights, args.config)
    scores = class_score_map(model, normalise(img))
    if scores.shape[0] == 1000:
        names = imagenet_classes()
    else:
        names = [f"class {k}" for k in range(scores.shape[0])]
    best = plot_score_map(img, scores, names, args.out)
    print(f"score map {scores.shape[1]}x{scores.shape[2]} for a {img.shape[0]}x"
          f"{img.shape[1]} image; top classes: {', '.join(names[k] for k in best)}")
    return args.out


def cmd_curves(args):
    rows = read_metrics(args.metrics)
    plot_curves(rows, args.out, title=args.title or os.path.abspath(args.metrics))
    print(f"{len(rows)} epochs")
    return args.out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text, image=False, default_out=None):
        p = sub.add_parser(name, help=help_text)
        if image:
            p.add_argument("image", help="an image file")
        p.add_argument("--weights", help="minivgg checkpoint, or Caffe, .safetensors, .pth, "
                                          ".npz weights")
        p.add_argument("--config", help="A-E: the untrained net's (default D), or checked "
                                         "against --weights")
        p.add_argument("--out", default=default_out, help="PNG to write")
        p.set_defaults(fn=fn)
        return p

    add("filters", cmd_filters, "conv1_1's filters", default_out="filters.png")
    p = add("features", cmd_features, "one layer's feature maps for an image", image=True,
            default_out="features.png")
    p.add_argument("--layer", default=None, help="e.g. conv1_2, relu3_1, pool4 (default: the "
                   "last conv of block 1: conv1_2, or conv1_1 in A)")
    p.add_argument("--scale", type=int, default=224, help="smallest side of the image")
    p.add_argument("--max-channels", type=int, default=64)
    p = add("scoremap", cmd_scoremap, "dense-evaluation class score map (Sec. 3.2)",
            image=True, default_out="scoremap.png")
    p.add_argument("--scale", type=int, default=384, help="test scale Q (smallest side)")
    p = sub.add_parser("curves", help="training curves from a metrics.csv")
    p.add_argument("metrics", help="metrics.csv written by minivgg.train")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--title", default="")
    p.set_defaults(fn=cmd_curves)

    args = parser.parse_args(argv)
    try:
        for flag, value in (("--scale", getattr(args, "scale", 1)),
                            ("--max-channels", getattr(args, "max_channels", 1))):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        check_scale(getattr(args, "scale", 1), "--scale")  # the per-image size budget
        path = args.fn(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
