"""Import torchvision's published VGG weights (vgg11, vgg13, vgg16, vgg19 = A, B, D, E).

torchvision stores a VGG as two `nn.Sequential`s, so its state_dict keys are positions:

    features.{i}.weight / .bias     the i-th module of `features` (conv, ReLU or max-pool)
    classifier.{0,3,6}.weight/bias  fc6, fc7, fc8 (1, 2, 4, 5 are ReLU and Dropout)

minivgg names the same layers as the original Caffe release (conv1_1 ... conv5_4, fc6, fc7,
fc8). `torchvision_key_map(config)` derives the correspondence from the Table 1 data in
`minivgg.models.CONFIGS` by replaying torchvision's `make_layers` (each conv adds two
modules, conv and ReLU; each block's max-pool adds one), so no index table is written out.

Two file formats are read:

* `.pth`, the file torchvision downloads, e.g. `vgg16-397923af.pth`. Reading it needs torch
  (an optional extra; minivgg never needs torch at run time).
* `.npz`, the same arrays under the same keys, written by
  `python -m minivgg.pretrained convert vgg16-397923af.pth vgg16.npz`. It loads with NumPy
  alone (`allow_pickle=False`), so a student without torch can use a file someone else made.

NOTE: these weights expect torchvision's preprocessing (RGB in [0, 1], then per-channel
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)), not the paper's mean-RGB
subtraction on 0-255 pixels (Sec. 2.1): see `examples/classify.py`.
NOTE: torchvision's VGG has an `AdaptiveAvgPool2d((7, 7))` before the classifier that the
paper does not have. At 224×224 the last pool already gives 7×7, so it is the identity and
the imported model matches torchvision exactly there. For other sizes use dense evaluation
(Sec. 3.2), which turns fc6-fc8 into convolutions.
"""

import argparse
import os
import sys
from collections import OrderedDict

import numpy as np

from minivgg import backend, checkpoint
from minivgg.models import ALIASES, CONFIGS, VGG, canonical_config, parse_layer

# The configurations torchvision publishes weights for (torchvision.models.vgg11 ... vgg19).
TORCHVISION_NAMES = {config: name for name, config in ALIASES.items()}  # "D" -> "vgg16"

# Where the real files come from (downloaded by the user; nothing is fetched here).
TORCHVISION_URLS = {
    "A": "https://download.pytorch.org/models/vgg11-8a719046.pth",
    "B": "https://download.pytorch.org/models/vgg13-19584684.pth",
    "D": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "E": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}


# ----------------------------------------------------------------------------------------
# Key correspondence, derived from Table 1
# ----------------------------------------------------------------------------------------

def _check_supported(config):
    """The canonical name of a config torchvision has weights for, or a clear error."""
    text = str(config)
    if text.lower().endswith("_bn"):
        raise ValueError(f"{text}: the batch-norm variants (vgg11_bn ... vgg19_bn) are not "
                         "supported: the paper's nets have no batch normalisation")
    name = canonical_config(text)
    if name not in TORCHVISION_NAMES:
        raise ValueError(f"torchvision publishes no weights for configuration {name}; "
                         f"it has {', '.join(f'{c} ({n})' for c, n in TORCHVISION_NAMES.items())}")
    return name


def torchvision_key_map(config):
    """OrderedDict {torchvision key: minivgg key} for configuration A, B, D or E.

    Replays torchvision's `make_layers` over Table 1: a conv occupies `features.{i}` and its
    ReLU `features.{i+1}`; the max-pool closing a block takes one more index.
    """
    name = _check_supported(config)
    mapping, i = OrderedDict(), 0
    for b, block in enumerate(CONFIGS[name], start=1):
        for j, spec in enumerate(block, start=1):
            kind, _, _ = parse_layer(spec)
            assert kind == "conv", "A, B, D and E hold only convolutions"
            for part in ("weight", "bias"):
                mapping[f"features.{i}.{part}"] = f"conv{b}_{j}.{part}"
            i += 2  # Conv2d, ReLU
        i += 1  # MaxPool2d
    for index, fc in ((0, "fc6"), (3, "fc7"), (6, "fc8")):  # Linear, ReLU, Dropout, ...
        for part in ("weight", "bias"):
            mapping[f"classifier.{index}.{part}"] = f"{fc}.{part}"
    return mapping


def guess_config(state):
    """The config (A, B, D or E) whose key map matches `state`'s keys, or None."""
    keys = set(state)
    for name in TORCHVISION_NAMES:
        if set(torchvision_key_map(name)) == keys:
            return name
    return None


# ----------------------------------------------------------------------------------------
# Reading and converting files
# ----------------------------------------------------------------------------------------

def read_state_dict(path):
    """{key: float NumPy array} from a torchvision `.pth` (needs torch) or its `.npz`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file. Download torchvision's weights "
                                f"(for example {TORCHVISION_URLS['D']}) and pass its path")
    if path.endswith(".npz"):  # no pickle, and a damaged file is one clear error
        return OrderedDict(checkpoint.read_npz(path, what="weights file"))
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a .pth file needs PyTorch (pip install torch, or "
                          "the minivgg[torch] extra). Without it, use a .npz made by "
                          "`python -m minivgg.pretrained convert IN.pth OUT.npz` on a "
                          "machine that has torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a pickled module, RuntimeError for junk
        raise ValueError(f"{path}: not a state_dict torch can load safely "
                         f"({type(e).__name__}); save one with "
                         "torch.save(model.state_dict(), path)") from e
    if isinstance(state, dict) and "state_dict" in state and not any(
            k.startswith("features.") for k in state):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got "
                         f"{type(state).__name__}")
    return OrderedDict((k, v.detach().cpu().numpy()) for k, v in state.items())


def convert(in_path, out_path):
    """Write a torchvision `.pth` as an `.npz` with the same keys (no pickle inside).

    The write goes to a temporary file first and is renamed at the end, so an interrupted
    conversion never leaves a truncated `.npz` behind. Returns the number of arrays.
    """
    state = read_state_dict(in_path)
    out_path = os.fspath(out_path)
    if not out_path.endswith(".npz"):
        raise ValueError(f"convert: the output must end in .npz, got {out_path!r}")
    tmp = out_path[:-4] + ".tmp.npz"  # np.savez would append .npz to any other suffix
    try:
        np.savez(tmp, **state)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk or Ctrl-C leaves no half-written file behind
        raise
    return len(state)


# ----------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------

def _check_state(state, config, name):
    """Every key present, none extra, no batch-norm: errors that say what to do."""
    if any(k.endswith(("running_mean", "running_var")) for k in state):
        raise ValueError(f"{config}: this file holds batch-norm statistics (a vgg*_bn "
                         "model); the batch-norm variants are not supported")
    mapping = torchvision_key_map(name)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        guess = guess_config(state)
        hint = (f"; the keys match configuration {guess} ({TORCHVISION_NAMES[guess]}): "
                f"pass config={guess!r}" if guess else "")
        raise ValueError(f"configuration {name} ({TORCHVISION_NAMES[name]}): "
                         f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}"
                         f"{'...' if len(unexpected) > 6 else ''}{hint}")
    return mapping


def from_torchvision_state_dict(state, config, dtype=np.float32, device="cpu"):
    """A minivgg `VGG` holding the arrays of a torchvision-layout state_dict, in eval mode.

    `num_classes` and the FC width are read from the arrays (1000 and 4096 for the
    published files); every shape is then checked against the model that Table 1 builds.
    """
    name = _check_supported(config)
    mapping = _check_state(state, config, name)
    fc6_w, fc8_w = np.shape(state["classifier.0.weight"]), np.shape(state["classifier.6.weight"])
    if len(fc6_w) != 2 or len(fc8_w) != 2:
        raise ValueError(f"classifier.0.weight (fc6) and classifier.6.weight (fc8) must be "
                         f"matrices, got shapes {fc6_w} and {fc8_w}")
    model = VGG(name, num_classes=fc8_w[0], fc_width=fc6_w[0], input_size=224, dtype=dtype)
    own = dict(model.named_parameters())
    problems = []
    for tv_key, key in mapping.items():
        got, want = tuple(np.shape(state[tv_key])), own[key].shape
        if got != want:
            problems.append(f"{tv_key} ({key}): file has shape {got}, "
                            f"configuration {name} expects {want}")
    if problems:
        guess = guess_config(state)
        raise ValueError("load_torchvision_vgg: " + "; ".join(problems[:4])
                         + ("..." if len(problems) > 4 else "")
                         + (" (is this the right configuration? the file's keys match "
                            f"{guess})" if guess and guess != name else ""))
    model.load_state_dict(OrderedDict((key, np.asarray(state[tv_key]))
                                      for tv_key, key in mapping.items()))
    model.eval()  # dropout off: these are trained weights
    return model.to(device) if device != "cpu" else model


def load_torchvision_vgg(state_dict_path, config, dtype=np.float32, device="cpu"):
    """Load torchvision's `vgg11/13/16/19` weights (`.pth` or `.npz`) as configuration A/B/D/E.

        model = load_torchvision_vgg("vgg16-397923af.pth", "D")   # or "vgg16"
        logits = model(x)   # x: (N, 3, 224, 224), torchvision-normalised

    Raises `ValueError` for A-LRN, C, the `_bn` variants, a file of another configuration
    (naming the one it matches) and any shape mismatch (naming both layers and shapes).
    """
    return from_torchvision_state_dict(read_state_dict(state_dict_path), config, dtype,
                                       backend.check_device(device))


# ----------------------------------------------------------------------------------------
# ImageNet class names
# ----------------------------------------------------------------------------------------

def imagenet_classes():
    """The 1000 ILSVRC-2012 class names in the order of the weights' outputs."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
    with open(path, encoding="utf-8") as f:
        names = [line.strip().replace("_", " ") for line in f
                 if line.strip() and not line.startswith("#")]
    assert len(names) == 1000, f"{path}: expected 1000 class names, found {len(names)}"
    return names


# ----------------------------------------------------------------------------------------
# Command line: python -m minivgg.pretrained convert IN.pth OUT.npz
# ----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivgg.pretrained",
                                     description="torchvision VGG weights for minivgg")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a torchvision .pth as a pickle-free .npz")
    c.add_argument("input", help="torchvision state_dict, e.g. vgg16-397923af.pth")
    c.add_argument("output", help="the .npz to write")
    c.add_argument("--config", help="also check the file against this configuration "
                                    "(A, B, D, E or vgg11/13/16/19)")
    args = parser.parse_args(argv)
    try:
        if args.config:
            state = read_state_dict(args.input)
            from_torchvision_state_dict(state, args.config)
        n = convert(args.input, args.output)
    except (ValueError, ImportError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} arrays to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
