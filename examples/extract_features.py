"""Deep features of every image in a folder (App. B), saved for another task's classifier.

    python examples/extract_features.py DIR --weights runs/x/best.npz --layer fc7 \\
        --out feats.npz                                   # one centre crop per image
    python examples/extract_features.py DIR --weights VGG_ILSVRC_16_layers.caffemodel \\
        --layer relu7 --scales 256 384 512 --flip --out feats.npz   # App. B's features

DIR holds class folders (DIR/<class>/*.jpg, labels from the sorted folder names, as in
training) or, without them, the images themselves (labels -1). --weights takes every
format `minivgg.pretrained` reads (training checkpoints, .safetensors, .pth, .npz,
.caffemodel) and the preprocessing they record.

Without --scales each image is rescaled so its smallest side is --resize and centre-cropped
to the net's input size (one crop); with --scales it is run densely at each scale and the
layer's map averaged over space (`minivgg.features`). The output .npz holds `features`
(N, D) float32, `labels` (N,), `paths` (N,), `classes`, and how they were made (layer,
scales, flip, normalize, weights); images that cannot be read are skipped, named in a
warning, counted, and listed in `skipped_paths`.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import checkpoint, data, features  # noqa: E402
from minivgg.images import (center_crop, check_rescale, check_scale,  # noqa: E402
                            load_rgb, rescale_smallest_side)
from minivgg.pretrained import load_pretrained  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DIR", help="a folder of class folders, or of images")
    p.add_argument("--weights", required=True, help="checkpoint or published weights")
    p.add_argument("--layer", default="fc7", help="layer name (default fc7; see "
                   "minivgg.features: Caffe's fc7 blob, after its ReLU, is relu7)")
    p.add_argument("--scales", type=int, nargs="+", metavar="Q",
                   help="dense features at these smallest sides, averaged (App. B)")
    p.add_argument("--combine", choices=features.COMBINES, default="mean",
                   help="with several --scales: average (VOC in App. B) or stack (Caltech)")
    p.add_argument("--resize", type=int, metavar="S", help="one crop: the smallest side "
                   "before the centre crop (default: the training scale S of a checkpoint, "
                   "else input size * 256/224)")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="keep the raw vectors (default: L2-normalised)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    return p.parse_args(argv)


def check_args(args):
    """Mistakes that need no file read, as ValueError (one line each)."""
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must end in .npz, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} exists; it was left as it is (add --overwrite to "
                         "replace it, or choose another --out)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out: folder {out_dir} does not exist")
    for name, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--resize", args.resize)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.scales and min(args.scales) < 1:
        raise ValueError(f"--scales must be positive, got {args.scales}")
    for flag, size in (("--scales", max(args.scales or [1])), ("--resize", args.resize or 1)):
        check_scale(size, flag)  # the per-image size budget (minivgg.images.MAX_PIXELS)


def list_images(folder):
    """(paths, labels, classes) of class folders, or of the images directly in `folder`."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    try:
        found = data.ImageFolder(folder, warn=False)
        return found.paths, found.labels, found.classes
    except data.DataError:
        loose = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.lower().endswith(data.IMAGE_EXTENSIONS) and not f.startswith("."))
        if not loose:
            raise ValueError(f"{folder!r} holds no images: neither class folders of images "
                             f"nor image files ({', '.join(data.IMAGE_EXTENSIONS)})") from None
        return loose, np.full(len(loose), -1, dtype=np.int64), []


def default_resize(model):
    """The training scale S recorded in a checkpoint, else torchvision's 256 for 224."""
    train = (getattr(model, "pretrained_meta", None) or {}).get("train_config") or {}
    scale = train.get("scale") if isinstance(train, dict) else None
    return int(scale) if scale else int(round(model.input_size * 256 / 224))


def features_of(model, images, args, to_input, resize):
    """(n, D) features of decoded uint8 RGB images."""
    if args.scales:
        return features.extract(model, images, args.layer, args.scales, args.flip,
                                args.normalize, to_input, args.combine, args.batch_size)
    c = model.input_size
    crops = np.stack([to_input(center_crop(rescale_smallest_side(img, resize), c))
                      for img in images])
    return features.extract(model, crops, args.layer, None, args.flip, args.normalize,
                            batch_size=args.batch_size)


def run(args):
    from tqdm import tqdm
    check_args(args)
    paths, labels, classes = list_images(args.data)
    if args.limit:
        paths, labels = paths[:args.limit], labels[:args.limit]
    model = load_pretrained(args.weights)
    features.check_layer(model, args.layer)
    to_input = features.input_transform(model)
    resize = args.resize or default_resize(model)
    if not args.scales and resize < model.input_size:
        raise ValueError(f"--resize {resize} is smaller than the net's {model.input_size}-"
                         "pixel input")
    feats, kept, skipped, chunk = [], [], [], 4 * args.batch_size
    with tqdm(total=len(paths), unit="img", file=sys.stderr, desc=args.layer) as bar:
        for start in range(0, len(paths), chunk):
            images, idx = [], []
            for i in range(start, min(start + chunk, len(paths))):
                try:
                    img = load_rgb(paths[i])
                    # a very thin image over the size budget at the largest scale: skipped
                    check_rescale(*img.shape[:2], max(args.scales or [resize]), paths[i])
                    images.append(img)
                    idx.append(i)
                except OSError as e:  # counted and named, not fatal
                    tqdm.write(f"warning: skipping: {e}", file=sys.stderr)
                    skipped.append(paths[i])
            if images:
                feats.append(features_of(model, images, args, to_input, resize))
                kept += idx
            bar.update(min(chunk, len(paths) - start))
    if not kept:
        raise ValueError(f"none of the {len(paths)} images in {args.data} could be read")
    X = np.concatenate(feats).astype(np.float32)
    checkpoint.write_npz(args.out, overwrite=args.overwrite, arrays=dict(
        features=X, labels=np.asarray(labels)[kept], paths=np.array([paths[i] for i in kept]),
        classes=np.array(classes, dtype=str), layer=np.array(args.layer),
        scales=np.array(args.scales or [], dtype=np.int64), resize=np.array(
            0 if args.scales else resize), flip=np.array(args.flip),
        normalize=np.array(args.normalize), combine=np.array(args.combine),
        weights=np.array(os.path.abspath(args.weights)),
        skipped_paths=np.array(skipped, dtype=str)))
    how = (f"dense at Q = {', '.join(map(str, args.scales))}" if args.scales
           else f"centre crop of {model.input_size} at S = {resize}")
    print(f"wrote {args.out}: {X.shape[0]} images x {X.shape[1]} features of {args.layer} "
          f"({how}{', flip' if args.flip else ''}"
          f"{', L2-normalised' if args.normalize else ''}); skipped {len(skipped)} "
          f"unreadable image{'' if len(skipped) == 1 else 's'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
