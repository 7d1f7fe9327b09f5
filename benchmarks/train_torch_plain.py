"""The small Imagenette recipe written as a plain PyTorch user writes it (issue 26's yardstick).

    python benchmarks/train_torch_plain.py                  # ../shared/data/imagenette2-224
    python benchmarks/train_torch_plain.py --data DIR --epochs 12 --threads 2

Unlike `train_torch_twin.py`, which feeds torch from minivgg's own loader so that only the
engines differ, nothing here comes from minivgg: the wall time it prints is what a PyTorch
user pays for the whole recipe, loader included, and `wall_time.py` sets minivgg's
`examples/train_imagenet.py --cache` against it. The recipe is the README's small one
(Sec. 3.1 scaled down), value for value:

* data: every image decoded once into memory as uint8, its smallest side rescaled to S = 72
  (Pillow's bilinear filter, antialiased when shrinking, as torchvision's Resize); each
  step takes random 64-pixel crops and horizontal flips of those arrays, subtracts the
  training set's mean RGB (0-255 scale) and adds AlexNet's PCA colour shift (std 0.1);
  validation is the centre 64-pixel crop of the image at Q = S;
* the net: VGG-A (Table 1's column A) at a quarter of the width, fc6/fc7 of 512 with dropout
  0.5, 2×2 max-pools, Glorot-uniform weights and zero biases;
* training: batch 64 (the last batch of an epoch may be smaller), SGD with lr 0.01,
  momentum 0.9, weight decay 5e-4, lr ÷10 after 2 epochs without a better val top-1 error
  (at most 3 times), 12 epochs, `--threads` torch threads (default 2, the machine's cores).

It prints the val top-1 accuracy of every epoch, then the best one and the wall time.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette2-224")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
# Table 1's column A: output channels of each 3×3 conv, "M" for a 2×2 max-pool.
VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


# The README's small recipe (Sec. 3.1 scaled down); each value can be changed by its flag.
RECIPE = {"batch-size": 64, "lr": 0.01, "momentum": 0.9, "wd": 5e-4, "dropout": 0.5,
          "width": 0.25, "fc-width": 512, "scale": 72, "crop": 64, "pca-std": 0.1, "seed": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", metavar="DIR", default=DEFAULT_DATA,
                   help="folder with train/<class>/ and val/<class>/ (default: "
                        "../shared/data/imagenette2-224)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    for name, value in RECIPE.items():
        p.add_argument(f"--{name}", type=type(value), default=value, help=f"(default {value})")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Data: decode once, then crops and flips on arrays
# ----------------------------------------------------------------------------------------

def list_images(split_dir):
    """(paths, labels) of split_dir/<class>/*, classes in sorted order."""
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(folder, file))
                labels.append(label)
    return paths, np.array(labels, dtype=np.int64), classes


def load(path, S):
    """uint8 (H, W, 3) with the smallest side rescaled to S."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        size = (S, max(S, round(h * S / w))) if w <= h else (max(S, round(w * S / h)), S)
        return np.asarray(im.resize(size, Image.BILINEAR), dtype=np.uint8)


def load_split(split_dir, S, threads):
    paths, labels, classes = list_images(split_dir)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # Pillow decodes without the GIL
        images = list(pool.map(lambda p: load(p, S), paths))
    return images, labels, classes


def colour_stats(images):
    """Mean RGB and the eigen-decomposition of the RGB covariance, averaged over images."""
    mean, outer = np.zeros(3), np.zeros((3, 3))
    for im in images:
        x = im.reshape(-1, 3).astype(np.float64)
        mean += x.mean(axis=0) / len(images)
        outer += x.T @ x / (len(x) * len(images))
    eigval, eigvec = np.linalg.eigh(outer - np.outer(mean, mean))
    return mean.astype(np.float32), np.clip(eigval, 0, None), eigvec


def centre_crops(images, crop):
    out = np.empty((len(images), crop, crop, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        top, left = (im.shape[0] - crop) // 2, (im.shape[1] - crop) // 2
        out[i] = im[top:top + crop, left:left + crop]
    return out


def train_batch(images, index, crop, rng):
    """Random crops, half of them flipped: uint8 (B, crop, crop, 3)."""
    out = np.empty((len(index), crop, crop, 3), dtype=np.uint8)
    for k, i in enumerate(index):
        im = images[i]
        top = rng.integers(0, im.shape[0] - crop + 1)
        left = rng.integers(0, im.shape[1] - crop + 1)
        out[k] = im[top:top + crop, left:left + crop]
    flip = rng.random(len(index)) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def to_tensor(batch, shift):
    """uint8 (B, H, W, 3) minus a colour, (3,) or one per image (B, 3) -> float32
    (B, 3, H, W)."""
    x = batch.astype(np.float32) - shift.reshape(-1, 1, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------
# The net and the loop
# ----------------------------------------------------------------------------------------

def vgg_a(width, fc_width, num_classes, crop, dropout):
    """VGG-A (Table 1) with every conv's channels scaled by `width`, Glorot init."""
    layers, channels, side = [], 3, crop
    for v in VGG_A:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
            side //= 2
        else:
            out = max(1, round(v * width))
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.ReLU(inplace=True)]
            channels = out
    net = torch.nn.Sequential(
        *layers, torch.nn.Flatten(),
        torch.nn.Linear(channels * side * side, fc_width), torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(fc_width, fc_width), torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(fc_width, num_classes))
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return net


def train_epoch(net, opt, data, args, rng):
    images, labels, mean, eigval, eigvec = data
    net.train()
    order, loss_sum = rng.permutation(len(images)), 0.0
    for start in range(0, len(order), args.batch_size):
        index = order[start:start + args.batch_size]
        # AlexNet's colour shift P (alpha * lambda), alpha ~ N(0, 0.1), on the 0-255 scale
        # (lambda / 255: the eigenvalues of the 0-1 scale, times 255), one per image
        alpha = rng.normal(0.0, args.pca_std, (len(index), 3)) * (eigval / 255.0)
        shift = (mean - alpha @ eigvec.T).astype(np.float32)  # x - shift = x - mean + shift
        x = to_tensor(train_batch(images, index, args.crop, rng), shift)
        loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(labels[index]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(index)
    return loss_sum / len(order)


def val_top1(net, crops, labels, mean, batch_size):
    net.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            x = to_tensor(crops[start:start + batch_size], mean)
            right += int((net(x).argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return right / len(crops)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels, classes = load_split(os.path.join(args.data, "train"), args.scale,
                                         args.threads)
    val, val_labels, _ = load_split(os.path.join(args.data, "val"), args.scale, args.threads)
    mean, eigval, eigvec = colour_stats(images)
    val_crops = centre_crops(val, args.crop)
    print(f"torch {torch.__version__}, {args.threads} threads: {len(images)} train and "
          f"{len(val)} val images decoded in {time.perf_counter() - t_start:.1f}s",
          flush=True)
    net = vgg_a(args.width, args.fc_width, len(classes), args.crop, args.dropout)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.wd)
    # lr ÷10 after `patience` epochs without a better error, at most 3 times (min_lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.1, patience=2, threshold=1e-4, threshold_mode="abs",
        min_lr=args.lr * 1e-3)
    best, best_epoch = 0.0, 0
    for epoch in range(1, args.epochs + 1):
        t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
        loss = train_epoch(net, opt, (images, labels, mean, eigval, eigvec), args, rng)
        top1 = val_top1(net, val_crops, val_labels, mean, args.batch_size)
        plateau.step(1.0 - top1)
        if top1 > best:
            best, best_epoch = top1, epoch
        print(f"epoch {epoch}/{args.epochs}: train loss {loss:.4f} | val top-1 "
              f"{100 * top1:.2f}% | lr {lr:g} | {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"best val top-1 {100 * best:.2f}% (epoch {best_epoch}); wall time "
          f"{time.perf_counter() - t_start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
