"""Weight files: which format a file is (from its first bytes), and pickle-free readers/writers.

    sniff_format(path)      "safetensors", "npz", "checkpoint", "pth", "prototxt" or "caffe"
    read_safetensors(path)  ({key: array}, info)   with the `safetensors` package's NumPy API
    read_npz(path)          ({key: array}, info)   checkpoint.read_npz: no pickle
    read_pth(path)          {key: array}           torch.load(weights_only=True), needs torch
    write_weights(path, state, info)   .safetensors or .npz, written atomically

`info` is the small dict minivgg stores beside the arrays (the safetensors header's
`__metadata__`, or a `__minivgg__` entry of an .npz): how the weights expect their input
(`mean_rgb`, `std_rgb` on the 0-255 scale), `pool_ceil_mode`, and where they came from. A file
someone else wrote has none; the readers return {} then.

NOTE: nothing here unpickles. `.npz` and safetensors hold raw arrays; a `.pth` is read by
torch's `weights_only` loader, which refuses anything but tensors and plain containers.
"""

import json
import os
import zipfile

import numpy as np

from minivgg import checkpoint  # no pickle, no allocation the file cannot back

INFO_KEY = "__minivgg__"  # where `info` lives: an .npz entry or a safetensors metadata key


def _missing_extra(package):
    return ImportError(f"reading and writing this format needs the '{package}' package: "
                       f"pip install 'minivgg[weights]' (or pip install {package})")


# ----------------------------------------------------------------------------------------
# What is this file?
# ----------------------------------------------------------------------------------------

def sniff_format(path):
    """The format of `path`, from its content (the file name is not trusted).

    safetensors: an 8-byte little-endian header length, then a JSON header ('{').
    zip: an .npz (NumPy arrays; a minivgg training checkpoint has a 'meta' entry) or a
    torch .pth (torch >= 1.6 saves a zip holding 'data.pkl'). A legacy torch .pth starts
    with a pickle protocol opcode (0x80). A prototxt is text. Anything else is tried as
    Caffe's binary NetParameter by the Caffe reader, which says so if it is not one.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short to be a weight file")
    n = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 2 <= n <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[0] == 0x80 and head[1] in range(2, 6):
        return "pth"
    if _looks_like_text(head):  # a .caffemodel's first bytes hold field tags and lengths
        return "prototxt"
    return "caffe"


def _zip_format(path):
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"weights file {path!r}: a zip archive that cannot be read ({e}); "
                         "truncated?") from e
    if any(n.endswith("data.pkl") for n in names):
        return "pth"
    if "meta.npy" in names and any(n.startswith("model/") for n in names):
        return "checkpoint"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise ValueError(f"{path}: a zip archive that is neither an .npz nor a torch .pth "
                     f"(it holds {names[:3]}...)")


def _looks_like_text(head):
    return all(32 <= b < 127 or b in b"\t\r\n" for b in head)


# ----------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------

def read_safetensors(path):
    """({key: float32 or float64 array}, info) of a `.safetensors` file, without torch.

    The `safetensors` package checks the header against the file (offsets inside the data,
    sizes that match dtype × shape, no overlaps) before any tensor is read.
    """
    try:
        import safetensors
        from safetensors import safe_open
    except ImportError:
        raise _missing_extra("safetensors") from None
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except TypeError as e:  # a dtype NumPy has no type for
        raise ValueError(f"{path}: holds tensors NumPy cannot represent ({e}); save them as "
                         "float32 (or float16) first") from e
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    return _floats(state, path), _parse_info(metadata.get(INFO_KEY), path)


def read_npz(path):
    """({key: array}, info) of an .npz of weight arrays (no pickle inside)."""
    state = checkpoint.read_npz(path, what="weights file")  # CheckpointError: a ValueError
    info = state.pop(INFO_KEY, None)
    return _floats(state, path), _parse_info(None if info is None else str(info), path)


def read_pth(path):
    """{key: array} of a torch `.pth` state_dict; needs torch, refuses pickled objects."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a .pth file needs PyTorch (pip install torch, or "
                          "the minivgg[torch] extra). Without it, use a .safetensors or .npz "
                          "made by `python -m minivgg.pretrained convert IN.pth OUT.npz` on "
                          "a machine that has torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a pickled module, RuntimeError for junk
        raise ValueError(f"{path}: not a state_dict torch can load safely "
                         f"({type(e).__name__}); save one with "
                         "torch.save(model.state_dict(), path)") from e
    if isinstance(state, dict) and "state_dict" in state and not any(
            k.startswith("features.") for k in state):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(hasattr(v, "detach") for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got "
                         f"{type(state).__name__}")
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def _floats(state, path):
    """Float arrays only (half precision widened to float32): weights, not anything else."""
    out = {}
    for k, v in state.items():
        # NOTE: once ml_dtypes is imported (onnx imports it) NumPy holds bfloat16 too;
        # refuse it with the same words as without it, whatever was imported first.
        if v.dtype.name == "bfloat16":
            raise ValueError(f"{path}: holds tensors NumPy cannot represent (bfloat16, entry "
                             f"{k!r}); save them as float32 (or float16) first")
        if v.dtype.kind != "f":
            raise ValueError(f"{path}: entry {k!r} has dtype {v.dtype}, not a float weight")
        out[k] = v.astype(np.float32) if v.dtype == np.float16 else v
    return out


def _parse_info(text, path):
    if text is None:
        return {}
    try:
        info = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: its {INFO_KEY} entry is not JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path}: its {INFO_KEY} entry is not a JSON object")
    return info


# ----------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------

def write_weights(path, state, info=None, overwrite=False):
    """Write {key: array} (+ `info`) as .safetensors or .npz, chosen by the file name.

    The file is written under a temporary name in the same folder and renamed at the end,
    so an interrupted write never leaves a truncated file under `path`; an existing `path`
    is kept (FileExistsError) unless `overwrite`. Returns the number of arrays written.
    """
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".npz")):
        raise ValueError(f"convert: the output must end in .npz or .safetensors, got {path!r}")
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    text = json.dumps(info or {})
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import save
        except ImportError:
            raise _missing_extra("safetensors") from None
        # "format": "pt" is what safetensors.torch writes; transformers and timm check it.
        blob = save(arrays, metadata={"format": "pt", INFO_KEY: text})
        checkpoint.atomic_write(path, lambda f: f.write(blob), suffix=".safetensors",
                                overwrite=overwrite)
    else:
        entries = dict(arrays, **{INFO_KEY: np.array(text)})
        checkpoint.atomic_write(path, lambda f: np.savez(f, **entries), overwrite=overwrite)
    return len(arrays)
