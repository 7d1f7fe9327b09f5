"""Evaluate trained VGG checkpoints with the paper's testing protocol (Sec. 3.2).

    python examples/evaluate_imagenet.py runs/imagenette-A/best.npz \\
        --data ../shared/data/imagenette2-224 \\
        --protocol center center-flip dense multicrop dense+multicrop --scales 72 64,72,80
    python examples/evaluate_imagenet.py VGG_ILSVRC_16_layers.caffemodel \\
        --data /path/to/ILSVRC2012 --protocol dense --scales 256 384

A CHECKPOINT may also be published weights (the authors' Caffe release, safetensors, .pth,
.npz: anything `minivgg.pretrained.load_pretrained` reads); their 1000 outputs are matched
to DIR/val's wnid folders by `minivgg.pretrained.ilsvrc_classes`.

Each `--scales` argument is one test setting: a single Q, or a comma-separated list of Q
whose soft-max outputs are averaged (multi-scale testing, Table 4). Each `--protocol` is
evaluated at each setting, and the results come out as one table shaped like the paper's
Tables 3-6: top-1 and top-5 validation error and images/s. Several checkpoints are fused by
averaging their soft-max outputs (Sec. 4.4, Table 6); they must predict the same classes.

Protocols: "center" (one centre crop, the single-crop baseline), "center-flip" (the centre
crop and its mirror image: the fair baseline beside dense and multi-crop, which also average
over flips), "dense" (the net made fully convolutional, whole image + flip), "multicrop"
(5×5 crops × 2 flips per scale) and "dense+multicrop" (the two averaged, Table 5). The paper
itself reports no centre-crop result. Every image and every crop is decoded and computed once
and shared by all the rows that use it.

Dense evaluation puts its windows on a 32-pixel grid (five 2×2 pools). By default the grid
is centred on the image (`--dense-align center`); `--dense-align top-left` keeps the plain
fully-convolutional layout, whose windows miss the last Q mod 32 rows and columns.
`--ceil-mode` runs the pools in Caffe's ceil mode (for nets trained that way; a checkpoint
that records ceil-mode pooling uses it anyway): the partial windows then cover every pixel.

Flags follow PyTorch's ImageNet example where they apply (--batch-size, --device,
--print-freq). DIR is the ILSVRC-layout root: the images are read from DIR/val/<wnid>/.
"""

import argparse
import os
import sys

import numpy as np

# Run from a checkout without installing: put the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import (backend, data, evaluate, images, pretrained,  # noqa: E402
                     run_state)
from minivgg.checkpoint import CheckpointError  # noqa: E402


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="minivgg training checkpoint(s) or published weights; several "
                        "are fused (Sec. 4.4)")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="ILSVRC-layout root; images are read from DIR/val/<wnid>/*")
    p.add_argument("--protocol", nargs="+", default=["center", "center-flip", "dense"],
                   choices=evaluate.PROTOCOLS,
                   help="test protocol(s), one table row each (default: center, "
                        "center-flip, dense; dense is Table 3's)")
    p.add_argument("--dense-align", choices=evaluate.DENSE_ALIGNS, default="center",
                   help="where dense evaluation's 32-pixel window grid sits: centred on "
                        "the image (default) or in its top-left corner")
    p.add_argument("--ceil-mode", action="store_true",
                   help="max-pool in Caffe's ceil mode (nets trained with it)")
    p.add_argument("--scales", nargs="+", default=None, metavar="Q[,Q...]",
                   help="test scale settings: '72' is single-scale, '64,72,80' averages "
                        "three scales (Table 4); default: the checkpoint's test scale")
    p.add_argument("-b", "--batch-size", type=int, default=64,
                   help="crops per forward pass; a dense batch holds about as many "
                        "pixels (default: 64)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate N images, evenly spaced over the sorted val list, so "
                        "every class is represented (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--conv-algo", choices=backend.CONV_ALGORITHMS, default="auto",
                   help="how 3x3 convs run (default: auto, Winograd where it was measured "
                        "faster, by a fixed rule of the layer shape; or im2col, winograd, "
                        "winograd4)")
    p.add_argument("--precision", choices=backend.PRECISIONS, default="fp32",
                   help="the CPU's conv and fc GEMMs: fp32 (default) or bf16 operands with "
                        "fp32 sums on AMX tiles")
    p.add_argument("-p", "--print-freq", type=int, default=1,
                   help="progress line every N chunks of 32 images (0: none)")
    return p.parse_args(argv)


def parse_scales(settings):
    """['72', '64,72,80'] -> [(72,), (64, 72, 80)]."""
    out = []
    for setting in settings:
        try:
            scales = tuple(int(q) for q in setting.split(","))
        except ValueError:
            raise UsageError(f"--scales: {setting!r} is not a Q or a comma-separated list of "
                             f"Q (e.g. 72 or 64,72,80)") from None
        if min(scales) < 1:
            raise UsageError(f"--scales: test scales must be positive, got {setting!r}")
        try:  # the per-image size budget: 100000 is one line, not an out-of-memory kill
            images.check_scale(max(scales), "--scales")
        except ValueError as e:
            raise UsageError(str(e)) from None
        out.append(scales)
    return out


def training_scales(meta):
    """(S text for the table, default Q) from a checkpoint's training config."""
    cfg = meta.get("train_config") or {}
    jitter, scale, q = cfg.get("scale_jitter"), cfg.get("scale"), cfg.get("test_scale")
    if jitter:
        s_text, default_q = f"[{jitter[0]};{jitter[1]}]", round((jitter[0] + jitter[1]) / 2)
    elif scale:
        s_text, default_q = str(scale), scale
    else:
        s_text, default_q = "?", meta["input_size"]
    return s_text, int(q or default_q)


def load_nets(paths, device, batch_size, root, dense_align="center", ceil_mode=False):
    """EvalNets for the weight files, checking that they can be fused."""
    nets, metas, val_wnids = [], [], None
    for path in paths:
        model = pretrained.load_pretrained(path, device=device)
        if ceil_mode:
            model.ceil_mode = True
        meta = dict(model.pretrained_meta, input_size=model.input_size)
        run_state.require_finite(model, path, "evaluate")
        if meta["mean_rgb"] is None or (meta["layout"] == "checkpoint" and not meta["classes"]):
            raise UsageError(f"checkpoint {path!r} has no class list or data statistics: "
                             f"not written by minivgg.train")
        classes = meta.get("classes")
        if not classes:  # published weights: ILSVRC's classes, found from DIR/val (listed once)
            if val_wnids is None:
                val_wnids = data.ImageFolder(os.path.join(root, "val")).classes
            classes = pretrained.ilsvrc_classes(val_wnids, path)
        name = f"{model.config} ({os.path.basename(path)})"
        nets.append(evaluate.EvalNet(model, pretrained.input_transform(meta), classes, name,
                                     batch_size, dense_align))
        metas.append(meta)
    evaluate.check_same_classes([n.classes for n in nets], list(paths))
    return nets, metas


def val_items(root, classes, limit):
    """[(path, label)] of DIR/val with labels in the model's class order."""
    val = data.ImageFolder(os.path.join(root, "val"))
    unknown = sorted(set(val.classes) - set(classes))
    if unknown:
        raise UsageError(f"{root}/val has classes the model(s) never saw: {unknown[:5]}")
    index = {wnid: i for i, wnid in enumerate(classes)}
    items = [(path, index[val.classes[label]]) for path, label in zip(val.paths, val.labels)]
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be positive, got {limit}")
        if limit < len(items):
            keep = np.linspace(0, len(items) - 1, limit).round().astype(int)
            items = [items[i] for i in keep]
    return items


def print_table(results, nets, s_texts):
    """One line per row, with the columns of the paper's Tables 3-6."""
    config = " + ".join(n.model.config for n in nets)
    train_s = " / ".join(sorted(set(s_texts)))
    header = (f"{'ConvNet config.':<16} {'train (S)':>9} {'test (Q)':>12} "
              f"{'protocol':<16} {'top-1 err %':>11} {'top-5 err %':>11} {'images/s':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        q = ",".join(str(q) for q in r["scales"])
        print(f"{config:<16} {train_s:>9} {q:>12} {r['protocol']:<16} "
              f"{r['top1_err']:>11.2f} {r['top5_err']:>11.2f} {r['images_per_s']:>9.1f}")


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (an image and its flip), got "
                         f"{args.batch_size}")
    if args.print_freq < 0:
        raise UsageError(f"-p/--print-freq must be 0 (no progress) or more, got "
                         f"{args.print_freq}")
    backend.check_device(args.device)
    backend.set_conv_algorithm(args.conv_algo)
    if args.precision != "fp32" and args.device != "cpu":
        raise UsageError(f"--precision {args.precision} runs on the CPU only (AMX tiles)")
    backend.set_precision(args.precision)
    nets, metas = load_nets(args.checkpoints, args.device, args.batch_size, args.data,
                            args.dense_align, args.ceil_mode)
    s_texts, default_qs = zip(*(training_scales(m) for m in metas))
    settings = parse_scales(args.scales) if args.scales else [(default_qs[0],)]
    crop = max(n.input_size for n in nets)
    for scales in settings:
        if min(scales) < crop:
            raise UsageError(f"test scale Q={min(scales)} is smaller than the {crop}x{crop} "
                             f"training crop: the rescaled image would be smaller than "
                             f"the crop; use Q >= {crop}")
    items = val_items(args.data, nets[0].classes, args.limit)
    rows = [(p, s) for s in settings for p in args.protocol]

    print(f"=> {len(items)} images from {os.path.join(args.data, 'val')}, "
          f"{len(nets)} model(s): {', '.join(n.name for n in nets)}, device {args.device}")

    def progress(done, total, every=max(args.print_freq, 1) * 32):
        if args.print_freq and (done % every < 32 or done == total):
            print(f"   {done}/{total} images", file=sys.stderr, flush=True)

    results = evaluate.evaluate_images(nets, images.load_rgb, items, rows,
                                       images.rescale_smallest_side, chunk_size=32,
                                       progress=progress)
    print_table(results, nets, s_texts)
    skipped = results[0].get("skipped", 0) if results else 0
    if skipped:
        print(f"note: {skipped} unreadable image(s) were skipped", file=sys.stderr)


def cli(argv=None):
    """main() with the errors a user can cause reported in one line: exit code 2."""
    try:
        main(argv)
    except (UsageError, CheckpointError, data.DataError, ValueError, RuntimeError,
            FileNotFoundError, ImportError) as e:
        # ValueError: evaluate's checks (class sets, image sizes); RuntimeError: no CUDA.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
