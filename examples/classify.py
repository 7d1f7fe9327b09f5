"""Classify an image with pretrained VGG weights imported into minivgg.

    python examples/classify.py cat.jpg --weights VGG_ILSVRC_16_layers.caffemodel  # authors'
    python examples/classify.py cat.jpg --weights model.safetensors      # timm vgg16.tv_in1k
    python examples/classify.py cat.jpg --weights vgg16-397923af.pth     # needs torch

Any file `minivgg.pretrained.load_pretrained` reads works: the authors' Caffe release (from
the VGG project page), safetensors (timm's, or minivgg's export), torchvision's `.pth` or its
`.npz`; the configuration is read from the file. See the README for where to get each one.

The image is resized so that its shorter side is 256 (bilinear) and centre-cropped to
224×224, then normalised as the weights expect (`model.pretrained_meta`): the Caffe weights
take 0-255 pixels minus the mean RGB, as the paper does (Sec. 2.1); torchvision's and timm's
take [0, 1] pixels normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import functional as F  # noqa: E402
from minivgg import images, no_grad, pretrained, run_state  # noqa: E402


def preprocess(path, resize=256, crop=224, meta=pretrained.TORCHVISION_INPUT):
    """An image file -> (1, 3, crop, crop) float32, normalised as `meta` says."""
    return pretrained.input_transform(meta)(read_crop(path, resize, crop))[None]  # NCHW


def read_crop(path, resize=256, crop=224):
    """An image file -> uint8 (crop, crop, 3): torchvision's ImageNet evaluation resize and
    centre crop.

    Decoding is minivgg's (`images.load_rgb`: every Pillow mode, EXIF orientation applied);
    raises `OSError` "cannot read image PATH: why" for a file that is not a readable image.
    """
    from PIL import Image
    img = Image.fromarray(images.load_rgb(path))
    w, h = img.size
    # Isotropic: the shorter side becomes `resize`, the longer one is truncated to an int,
    # exactly as torchvision's Resize(256) computes it.
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    # a very thin image would be huge at that size: refused before anything is allocated
    images.check_pixels(size[1], size[0], f"image {path} ({h}x{w}) resized to shorter "
                                          f"side {resize}")
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))  # CenterCrop
    img = img.crop((left, top, left + crop, top + crop))
    return np.asarray(img)


def top_k(probs, k=5):
    """Indices and probabilities of the k largest entries, best first."""
    idx = np.argsort(probs)[::-1][:k]
    return idx, probs[idx]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--weights", required=True,
                        help=".caffemodel, .safetensors, .pth (needs torch) or .npz")
    parser.add_argument("--config", help="check the file holds this configuration (A-E or "
                                         "vgg11/13/16/19); default: read from the file")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print")
    args = parser.parse_args(argv)
    try:
        if args.top < 1:
            raise ValueError(f"--top must be at least 1, got {args.top}")
        logits, model = classify(args.image, args.weights, args.config)
    except (OSError, ValueError, ImportError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    probs = F.softmax(logits[None])[0]
    if len(probs) == 1000:
        names = pretrained.imagenet_classes()
    else:
        names = [f"class {i}" for i in range(len(probs))]
    print(f"{args.image}: VGG {model.config}, top-{min(args.top, len(probs))}")
    for rank, (i, p) in enumerate(zip(*top_k(probs, args.top)), start=1):
        print(f"{rank}. {p * 100:6.2f}%  {names[i]} ({i})")
    return 0


def classify(image, weights, config):
    """(logits of the image, model). The image is read first: a bad one costs no time
    loading weights. Weights or scores holding NaN or Inf are an error, not a ranking."""
    img = read_crop(image)
    model = pretrained.load_pretrained(weights, config)
    run_state.require_finite(model, weights, "classify with")
    x = pretrained.input_transform(model.pretrained_meta)(img)[None]
    with no_grad():
        logits = model(x).numpy()[0]
    if not np.isfinite(logits).all():
        raise ValueError(f"{weights}: the network's scores for {image} are not finite "
                         f"(NaN or Inf); refusing to rank them")
    return logits, model


if __name__ == "__main__":
    sys.exit(main())
