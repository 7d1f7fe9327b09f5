"""`python -m minivgg.pretrained convert IN OUT` and `... info FILE` (OUT or FILE may be
.onnx: `minivgg.pretrained.onnx_export`)."""

import argparse
import os
import sys

import minivgg.pretrained as pretrained
from minivgg.pretrained import onnx_export


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
                                       "minivgg checkpoint as .safetensors, .npz or .onnx")
    c.add_argument("input", help="e.g. VGG_ILSVRC_16_layers.caffemodel, vgg16-397923af.pth")
    c.add_argument("output", help="the .safetensors, .npz or .onnx to write (the format "
                                  "follows the extension)")
    c.add_argument("--layout", choices=("torchvision", "timm"), default="torchvision",
                   help="key names to write (default: torchvision's)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it exists (else it is kept and nothing is written)")
    ox = c.add_argument_group("ONNX (.onnx output; minivgg.pretrained.onnx_export)")
    ox.add_argument("--head", choices=("fc", "dense"), default="fc",
                    help="fc: the classifier on crops of the training size; dense: the "
                         "fully-convolutional net of Sec. 3.2 for any image size")
    ox.add_argument("--softmax", action="store_true", help="end with a Softmax (probs)")
    ox.add_argument("--channel-order", choices=("auto", "rgb", "bgr"), default="auto",
                    help="input channel order (auto: BGR for Caffe-born weights, as the "
                         "authors' net takes them, else RGB)")
    for p in (c, sub.add_parser("info", help="say what a weight file holds")):
        if p is not c:
            p.add_argument("input", help="a weight file")
        p.add_argument("--config", help="check the file against this configuration "
                                        "(A, B, D, E or vgg11/13/16/19)")
        p.add_argument("--prototxt", help="a Caffe deploy.prototxt for the .caffemodel")
    args = parser.parse_args(argv)
    try:
        if args.input.endswith(".onnx"):  # ONNX is written, never read back as weights
            if args.command == "convert":
                raise ValueError(f"{args.input}: an ONNX file is an export; convert from the "
                                 "weights it was made from")
            print(onnx_export.describe(args.input))
            return 0
        if args.command == "convert":
            _check_output(args.output, args.overwrite)  # before any slow read
        model = pretrained.load_pretrained(args.input, args.config, args.prototxt)
        if args.command == "info":
            print(_describe(model, args.input))
            return 0
        if args.output.endswith(".onnx"):
            proto = onnx_export.export_onnx(model, args.output, args.head, args.softmax,
                                            args.channel_order, args.overwrite)
            props = {p.key: p.value for p in proto.metadata_props}
            print(f"wrote {args.output} (ONNX opset {onnx_export.OPSET}, VGG {model.config}, "
                  f"{args.head} head, input {props['minivgg.channel_order']})")
            return 0
        n = pretrained.save_pretrained(model, args.output, args.layout, args.overwrite)
    except (ValueError, ImportError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} arrays to {args.output} ({args.layout} keys, VGG {model.config})")
    return 0


def _check_output(path, overwrite):
    """The output's format comes from its extension; an existing file is kept unless
    --overwrite (both checked before the input is read)."""
    if not path.endswith((".npz", ".safetensors", ".onnx")):
        raise ValueError(f"convert: the output must end in .npz, .safetensors or .onnx, "
                         f"got {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; it was left as it is (add --overwrite to "
                              "replace it, or choose another name)")
