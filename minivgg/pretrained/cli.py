"""`python -m minivgg.pretrained convert IN OUT` and `... info FILE`."""

import argparse
import sys

import minivgg.pretrained as pretrained


def _describe(model, path):
    meta = model.pretrained_meta
    scale = ("RGB 0-255 minus mean_rgb" if meta.get("std_rgb") is None
             else "RGB 0-255, (pixel - mean_rgb) / std_rgb")
    mean = [round(m, 3) for m in meta["mean_rgb"]] if meta.get("mean_rgb") else None
    return (f"{path}: VGG {model.config} ({model.num_parameters():,} parameters), "
            f"{meta['layout']} layout, width {model.width:g}, fc {model.fc_width}, "
            f"{model.num_classes} classes, input {model.input_size}; expects {scale} "
            f"(mean_rgb {mean}); pool ceil mode: {model.ceil_mode}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivgg.pretrained",
                                     description="pretrained VGG weights for minivgg")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a .caffemodel, .safetensors, .pth, .npz or "
                                       "minivgg checkpoint as .safetensors or .npz")
    c.add_argument("input", help="e.g. VGG_ILSVRC_16_layers.caffemodel, vgg16-397923af.pth")
    c.add_argument("output", help="the .safetensors or .npz to write")
    c.add_argument("--layout", choices=("torchvision", "timm"), default="torchvision",
                   help="key names to write (default: torchvision's)")
    for p in (c, sub.add_parser("info", help="say what a weight file holds")):
        if p is not c:
            p.add_argument("input", help="a weight file")
        p.add_argument("--config", help="check the file against this configuration "
                                        "(A, B, D, E or vgg11/13/16/19)")
        p.add_argument("--prototxt", help="a Caffe deploy.prototxt for the .caffemodel")
    args = parser.parse_args(argv)
    try:
        model = pretrained.load_pretrained(args.input, args.config, args.prototxt)
        if args.command == "info":
            print(_describe(model, args.input))
            return 0
        n = pretrained.save_pretrained(model, args.output, args.layout)
    except (ValueError, ImportError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} arrays to {args.output} ({args.layout} keys, VGG {model.config})")
    return 0
