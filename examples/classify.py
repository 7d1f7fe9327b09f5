"""Classify an image with torchvision's pretrained VGG weights, imported into minivgg.

    python examples/classify.py cat.jpg --weights vgg16-397923af.pth            # needs torch
    python examples/classify.py cat.jpg --weights vgg16.npz --config D          # NumPy only

Get the weights from torchvision's published URLs (see `minivgg.pretrained.TORCHVISION_URLS`,
e.g. https://download.pytorch.org/models/vgg16-397923af.pth for D) on a machine with
internet access, and optionally convert them once with
`python -m minivgg.pretrained convert vgg16-397923af.pth vgg16.npz`.

Preprocessing is torchvision's, because these weights were trained with it: resize the
shorter side to 256 (bilinear), centre-crop 224×224, scale to [0, 1], normalise with
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). The paper instead subtracts the
mean RGB of the training set from 0-255 pixels (Sec. 2.1) and tests on the whole image
(Sec. 3.2); the original Caffe weights expect that, torchvision's do not.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import functional as F  # noqa: E402
from minivgg import checkpoint, data, no_grad, pretrained  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(path, resize=256, crop=224):
    """An image file -> (1, 3, crop, crop) float32, torchvision's ImageNet evaluation recipe.

    Decoding is minivgg's (`data.load_rgb`: every Pillow mode, EXIF orientation applied);
    raises `OSError` "cannot read image PATH: why" for a file that is not a readable image.
    """
    from PIL import Image
    img = Image.fromarray(data.load_rgb(path))
    w, h = img.size
    # Isotropic: the shorter side becomes `resize`, the longer one is truncated to an int,
    # exactly as torchvision's Resize(256) computes it.
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))  # CenterCrop
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    x = (x - MEAN) / STD
    return x.transpose(2, 0, 1)[None].copy()  # NCHW


def top_k(probs, k=5):
    """Indices and probabilities of the k largest entries, best first."""
    idx = np.argsort(probs)[::-1][:k]
    return idx, probs[idx]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--weights", required=True,
                        help="torchvision state_dict (.pth, needs torch) or its .npz")
    parser.add_argument("--config", default="D",
                        help="A, B, D or E (= vgg11, vgg13, vgg16, vgg19); default D")
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
    x = preprocess(image)
    model = pretrained.load_torchvision_vgg(weights, config)
    bad = checkpoint.nonfinite(model.state_dict())
    if bad:
        raise ValueError(f"{weights}: weights {', '.join(bad[:3])} hold NaN or Inf; "
                         f"refusing to classify with them")
    with no_grad():
        logits = model(x).numpy()[0]
    if not np.isfinite(logits).all():
        raise ValueError(f"{weights}: the network's scores for {image} are not finite "
                         f"(NaN or Inf); refusing to rank them")
    return logits, model


if __name__ == "__main__":
    sys.exit(main())
