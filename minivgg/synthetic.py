"""A built-in dataset of procedurally drawn images, so training runs with no download.

Ten classes: five shapes (disc, square, triangle, ring, cross) and five textures
(horizontal, vertical and diagonal stripes, checkerboard, dots), each drawn at a random
position, scale and rotation over a noisy background of random colour. Each class also has
its own hue family (hue = class / 10, jittered by +-0.03), so colour and form both carry the
label; on a 2-core CPU a small VGG learns them within minutes.

Everything is labelled "synthetic" where it is reported; the numbers it gives say that
the code learns, not how VGG does on photographs.
"""

import colorsys

import numpy as np

CLASSES = ("disc", "square", "triangle", "ring", "cross",
           "horizontal-stripes", "vertical-stripes", "diagonal-stripes", "checkerboard",
           "dots")


def _shape_mask(kind, u, v, r):
    """Boolean mask of a shape of radius r in rotated, centred coordinates (u, v)."""
    d = np.hypot(u, v)
    if kind == "disc":
        return d < r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8 * r
    if kind == "triangle":  # equilateral, circumradius r: inside three half-planes
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) < r / 2
        return inside
    if kind == "ring":
        return (d < r) & (d > 0.55 * r)
    if kind == "cross":
        arm = 0.3 * r
        return ((np.abs(u) < arm) & (np.abs(v) < r)) | ((np.abs(v) < arm) & (np.abs(u) < r))
    raise ValueError(kind)


def _texture_mask(kind, u, v, period, rng):
    """Boolean pattern of a texture with the given period (pixels)."""
    w = 2 * np.pi / period
    if kind == "horizontal-stripes":
        angle = rng.uniform(-0.2, 0.2)
    elif kind == "vertical-stripes":
        angle = np.pi / 2 + rng.uniform(-0.2, 0.2)
    elif kind == "diagonal-stripes":
        angle = rng.choice([np.pi / 4, -np.pi / 4]) + rng.uniform(-0.2, 0.2)
    else:
        angle = None
    if angle is not None:  # stripes run along `angle`, so vary across it
        return np.sin(w * (-u * np.sin(angle) + v * np.cos(angle))) > 0
    if kind == "checkerboard":
        return np.sin(w * u) * np.sin(w * v) > 0
    if kind == "dots":
        pu, pv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return np.hypot(pu, pv) < period / 4
    raise ValueError(kind)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def draw(label, size, rng):
    """One uint8 (size, size, 3) image of class `label`, drawn with generator `rng`."""
    kind = CLASSES[label]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    background = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.6))
    hue = label / len(CLASSES) + rng.uniform(-0.03, 0.03)
    foreground = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    r = rng.uniform(0.18, 0.34) * size
    theta = rng.uniform(0, 2 * np.pi)
    du, dv = xx - cx, yy - cy
    u = du * np.cos(theta) + dv * np.sin(theta)
    v = -du * np.sin(theta) + dv * np.cos(theta)
    if label < 5:
        mask = _shape_mask(kind, u, v, r)
    else:  # a textured patch: a square window of the pattern, axis-aligned
        window = np.maximum(np.abs(du), np.abs(dv)) < 1.2 * r
        mask = window & _texture_mask(kind, du, dv, rng.uniform(0.12, 0.22) * size, rng)
    img = np.where(mask[..., None], foreground, background)
    img += rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticImages:
    """`n` drawn images of `size` x `size`, balanced over the ten classes, held in memory.

    Image i of a split is a function of (seed, split, i) only. Same interface as
    `minivgg.data.ImageFolder`: `classes`, `labels`, `paths`, `load(i)`.
    """

    def __init__(self, n, size=36, seed=0, split="train"):
        if n < 1 or size < 8:
            raise ValueError(f"SyntheticImages: need n >= 1 and size >= 8, got n={n}, "
                             f"size={size}")
        self.classes = list(CLASSES)
        self.labels = np.arange(n, dtype=np.int64) % len(CLASSES)
        split_id = {"train": 0, "val": 1}.get(split, 2)
        self.images = [draw(int(y), size, np.random.default_rng([seed, split_id, i]))
                       for i, y in enumerate(self.labels)]
        self.paths = [f"synthetic/{split}/{i}" for i in range(n)]
        self.cache = self.images

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return self.images[i]
