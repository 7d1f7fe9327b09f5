"""Pretrained VGG weights in and out: the authors' Caffe files, torchvision, timm, safetensors.

    from minivgg.pretrained import load_pretrained
    model = load_pretrained("VGG_ILSVRC_16_layers.caffemodel")  # D, the authors' own (Sec. 1)
    model = load_pretrained("vgg16-397923af.pth")               # torchvision's (needs torch)
    model = load_pretrained("model.safetensors")                # timm's vgg16.tv_in1k
    save_pretrained(model, "vgg16.safetensors")                 # torchvision's key names

    python -m minivgg.pretrained convert VGG_ILSVRC_16_layers.caffemodel vgg16.safetensors
    python -m minivgg.pretrained info vgg16.safetensors

`load_pretrained` picks the reader from the file's content (`files.sniff_format`), builds the
Table 1 column the weights fit (config, conv width, FC width and classes read from the
arrays) and returns it in eval mode with two attributes the rest of minivgg reads:

* `model.pretrained_meta`: how the weights expect their input, as x = (pixel - mean_rgb) /
  std_rgb on RGB pixels in 0-255 (std_rgb None: no division), plus `layout` (caffe,
  torchvision, timm, checkpoint), `pool_ceil_mode` and, for a checkpoint, `classes`.
* `model.ceil_mode`: True for Caffe weights, whose max-pools round up (see `caffe`); it
  switches every pool of the net, so dense evaluation pools as Caffe did.

The pieces: `files` (formats, pickle-free readers and writers), `layouts` (torchvision's and
timm's key names, derived from Table 1), `caffe` (the .caffemodel reader).
"""

import os

import numpy as np

from minivgg import backend
from minivgg.images import not_regular
from minivgg.pretrained import caffe, files, layouts  # noqa: F401  (submodules)
from minivgg.pretrained.caffe import CAFFE_INPUT, VGG_PROJECT_PAGE, load_caffe_vgg
from minivgg.pretrained.layouts import (TIMM_HUB_NAMES, TORCHVISION_INPUT, TORCHVISION_NAMES,
                                        TORCHVISION_URLS, from_state_dict,
                                        from_torchvision_state_dict, guess_config,
                                        timm_key_map, to_state_dict, torchvision_key_map)

__all__ = ["load_pretrained", "save_pretrained", "convert", "load_caffe_vgg",
           "load_torchvision_vgg", "read_state_dict", "from_torchvision_state_dict",
           "from_state_dict", "to_state_dict", "torchvision_key_map", "timm_key_map",
           "guess_config", "imagenet_classes", "input_transform", "ilsvrc_classes",
           "TORCHVISION_URLS", "TORCHVISION_NAMES", "TIMM_HUB_NAMES", "VGG_PROJECT_PAGE",
           "TORCHVISION_INPUT", "CAFFE_INPUT", "main"]

WHERE_TO_GET = (f"the authors' Caffe files are on the VGG project page ({VGG_PROJECT_PAGE}), "
                f"torchvision's at {TORCHVISION_URLS['D']} (and vgg11/13/19), timm's as "
                f"{TIMM_HUB_NAMES['D']} (model.safetensors) on the Hugging Face hub")


def load_pretrained(path, config=None, prototxt=None, dtype=np.float32, device="cpu"):
    """A minivgg `VGG` holding the weights in `path`, whichever format they are in.

    Formats, told apart by content: Caffe `.caffemodel` (old or new layer format; `prototxt`
    optional), `.safetensors` (torchvision's or timm's keys, or minivgg's export), torch
    `.pth` (needs torch), `.npz` of torchvision keys, and minivgg training checkpoints.
    `config` (A-E or vgg11/13/16/19) is inferred when None, and checked when given.
    Raises `FileNotFoundError`, `ImportError` (a missing optional package) or `ValueError`,
    each with one line that names the file.
    """
    path = os.fspath(path)
    device = backend.check_device(device)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file, it does not exist; {WHERE_TO_GET}")
    kind = not_regular(os.stat(path).st_mode)  # a FIFO would block the reader forever
    if kind is not None:
        raise ValueError(f"{path}: it is {kind}, not a weight file")
    kind = files.sniff_format(path)
    if kind == "prototxt":
        raise ValueError(f"{path}: a text file, not a weight file (a Caffe deploy.prototxt "
                         "describes the net but holds no weights; pass the .caffemodel, with "
                         "this file as its prototxt)")
    if kind == "caffe":
        return caffe.load_caffe_vgg(path, prototxt, config, dtype, device)
    if kind == "checkpoint":
        return _load_checkpoint(path, config, device)
    if kind == "pth":
        state, info = files.read_pth(path), {}
    elif kind == "npz":
        state, info = files.read_npz(path)
    else:
        state, info = files.read_safetensors(path)
    try:
        model = from_state_dict(state, config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if info:  # written by minivgg: the preprocessing of the weights' origin (e.g. Caffe's)
        # NOTE: "mean_rgb": null (files of an untrained net, before 2026-12) means "no
        # statistics recorded": keep the layout's default rather than subtract NaN.
        known = ("mean_rgb", "std_rgb") if info.get("mean_rgb") is not None else ()
        model.pretrained_meta.update({k: info[k] for k in known + ("pool_ceil_mode",)
                                      if k in info})
        model.ceil_mode = bool(info.get("pool_ceil_mode", False))
    return model.to(device) if device != "cpu" else model


def _load_checkpoint(path, config, device):
    """A minivgg training checkpoint, with its classes and mean RGB as `pretrained_meta`."""
    from minivgg.models import canonical_config
    from minivgg.run_state import load_model
    model, meta = load_model(path, device)
    if config is not None and canonical_config(config) != model.config:
        raise ValueError(f"{path}: the checkpoint holds configuration {model.config}, not "
                         f"{canonical_config(config)}")
    stats = meta.get("data_stats") or {}
    model.pretrained_meta = {"layout": "checkpoint", "mean_rgb": stats.get("mean_rgb"),
                             "std_rgb": None, "pool_ceil_mode": bool(model.ceil_mode),
                             "classes": meta.get("classes"), "train_config": meta.get("config")}
    return model


def save_pretrained(model, path, layout="torchvision", overwrite=False):
    """Write `model` as `.safetensors` (or `.npz`) with torchvision's (or timm's) key names.

    The file also records, in its metadata, how the weights expect their input and whether
    their pools round up, so `load_pretrained` gives back the same model. A net that never
    had input statistics (built by `models.vgg`, not loaded) records none, and so reads
    back with its layout's default, torchvision's normalisation, as a `.pth` does. An
    existing `path` is kept (FileExistsError) unless `overwrite`. Returns the number of
    arrays written.
    """
    meta = model.pretrained_meta or {}
    info = {"config": model.config, "layout": layout,
            "source_layout": meta.get("layout", "minivgg"),
            "pool_ceil_mode": bool(model.ceil_mode)}
    if meta.get("mean_rgb") is not None:
        info.update(mean_rgb=meta["mean_rgb"], std_rgb=meta.get("std_rgb"))
    return files.write_weights(path, to_state_dict(model, layout), info, overwrite)


def convert(in_path, out_path, config=None, layout="torchvision", prototxt=None,
            overwrite=False):
    """Read any supported file and write it as `.safetensors` or `.npz`; returns #arrays."""
    return save_pretrained(load_pretrained(in_path, config, prototxt), out_path, layout,
                           overwrite)


def read_state_dict(path):
    """{key: float NumPy array} of a torchvision `.pth` (needs torch), `.npz` or safetensors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file. Download torchvision's weights "
                                f"(for example {TORCHVISION_URLS['D']}) and pass its path")
    if path.endswith(".npz"):
        return files.read_npz(path)[0]
    if path.endswith(".safetensors"):
        return files.read_safetensors(path)[0]
    return files.read_pth(path)


def load_torchvision_vgg(state_dict_path, config, dtype=np.float32, device="cpu"):
    """Load torchvision's `vgg11/13/16/19` weights (`.pth` or `.npz`) as configuration A/B/D/E.

        model = load_torchvision_vgg("vgg16-397923af.pth", "D")   # or "vgg16"
        logits = model(x)   # x: (N, 3, 224, 224), torchvision-normalised

    Raises `ValueError` for A-LRN, C, the `_bn` variants, a file of another configuration
    (naming the one it matches) and any shape mismatch (naming both layers and shapes).
    """
    return from_torchvision_state_dict(read_state_dict(state_dict_path), config, dtype,
                                       backend.check_device(device))


def input_transform(meta):
    """uint8 RGB (H, W, 3) -> float32 (3, H, W) as the weights expect, from `pretrained_meta`.

    x = (pixel - mean_rgb) / std_rgb on the 0-255 scale: the paper's mean subtraction
    (Sec. 2.1) for Caffe weights and minivgg checkpoints, torchvision's normalisation for
    torchvision and timm weights.
    """
    from minivgg.images import to_chw_float32
    mean = np.asarray(meta["mean_rgb"], dtype=np.float32)
    if meta.get("std_rgb") is None:
        return lambda img: to_chw_float32(img, mean)
    std = np.asarray(meta["std_rgb"], dtype=np.float32)[:, None, None]
    return lambda img: to_chw_float32(img, mean) / std


# The ten Imagenette classes (a subset of ILSVRC-2012) and their index among the 1000, which
# is the wnid's place in the sorted list of ILSVRC-2012 wnids (a test checks the names).
IMAGENETTE_INDEX = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491,
                    "n03028079": 497, "n03394916": 566, "n03417042": 569, "n03425413": 571,
                    "n03445777": 574, "n03888257": 701}


def ilsvrc_classes(val_wnids, where="weights"):
    """The 1000 class ids of ImageNet weights, in output order, for a val folder's wnids.

    ILSVRC-2012's class k is the k-th wnid in sorted order: a full val folder (1000
    wnids) gives them all; Imagenette's ten are placed by `IMAGENETTE_INDEX`; the other
    entries are placeholders "ilsvrc-k" that no folder matches.
    """
    val_wnids = sorted(val_wnids)
    if len(val_wnids) == 1000:
        return val_wnids
    unknown = [w for w in val_wnids if w not in IMAGENETTE_INDEX]
    if unknown:
        raise ValueError(f"{where}: ImageNet weights index the 1000 ILSVRC-2012 classes; the "
                         f"val folder's {unknown[:3]} are not among the ten Imagenette "
                         "classes minivgg knows the index of, and the folder has not all "
                         "1000 wnids (whose sorted order gives the index)")
    classes = [f"ilsvrc-{k}" for k in range(1000)]
    for wnid, k in IMAGENETTE_INDEX.items():
        classes[k] = wnid
    return classes


def imagenet_classes():
    """The 1000 ILSVRC-2012 class names in the order of the weights' outputs."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "imagenet_classes.txt")
    with open(path, encoding="utf-8") as f:
        names = [line.strip().replace("_", " ") for line in f
                 if line.strip() and not line.startswith("#")]
    assert len(names) == 1000, f"{path}: expected 1000 class names, found {len(names)}"
    return names

