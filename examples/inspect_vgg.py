"""Look inside the six VGG configurations: layer tables, receptive fields, where the cost is.

    python examples/inspect_vgg.py                      # everything, PNGs in the current folder
    python examples/inspect_vgg.py --configs D E --out-dir /tmp/vgg --no-tables

Three parts, every number computed from real minivgg layers, not copied from the paper:

1. the layer table of every configuration of Table 1 (`minivgg.summary`, the same table as
   `python -m minivgg summary D`): output shape, parameters, multiply-adds, receptive field;
2. Sec. 2.3's argument for 3×3 filters: stacks of 1, 2 and 3 `nn.Conv2d` 3×3 layers against
   one 5×5 and one 7×7 layer. Their weights are counted from the layers and their receptive
   fields measured by back-propagating from one output pixel to the input and measuring the
   non-zero support of the input gradient;
3. parameters and multiply-adds per block (conv blocks 1-5, the three FC layers), as text
   and as a bar chart PNG (`vgg_blocks.png`), plus the receptive-field picture
   (`receptive_fields.png`). matplotlib is optional: without it the PNGs are skipped with a
   message and the text is still printed.
"""

import argparse
import os
import sys
from collections import OrderedDict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import nn  # noqa: E402
from minivgg.models import CONFIGS, VGG  # noqa: E402
from minivgg.plots import import_pyplot, save_figure  # noqa: E402
from minivgg.summary import layer_table, summary  # noqa: E402
from minivgg.tensor import Tensor  # noqa: E402


# ----------------------------------------------------------------------------------------
# 2. Receptive fields of 3x3 stacks (Sec. 2.3)
# ----------------------------------------------------------------------------------------

def conv_stack(channels, kernel, depth):
    """`depth` kernel×kernel convolutions (C -> C, 'same' padding) with a ReLU after each."""
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, kernel, 1, kernel // 2), nn.ReLU()]
    return nn.Sequential(*layers)


def measured_receptive_field(stack, channels, size=15, seed=0):
    """Side of the input region that one output pixel depends on, found by backward.

    The gradient of the centre output pixel (channel 0) with respect to the input is
    non-zero exactly on that pixel's receptive field. Weights and input are positive, so no
    ReLU is inactive and no sum cancels by accident (either would hide part of the field).
    """
    rng = np.random.default_rng(seed)
    for p in stack.parameters():
        p.data = rng.uniform(0.1, 1.0, size=p.shape).astype(np.float64)
    x = Tensor(rng.uniform(0.1, 1.0, size=(1, channels, size, size)), requires_grad=True)
    y = stack(x)
    g = np.zeros(y.shape)
    g[0, 0, size // 2, size // 2] = 1.0  # d(centre pixel) / d(everything)
    y.backward(g)
    weight = np.abs(x.grad).sum(axis=(0, 1))  # (H, W): how much each input pixel counts
    rows, cols = np.nonzero(weight > 0)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, weight


def receptive_field_rows(channels=4):
    """One row per stack: name, weights (no biases), weights / C², nonlinearities, RF."""
    rows = []
    for kernel, depth in ((3, 1), (3, 2), (3, 3), (5, 1), (7, 1)):
        stack = conv_stack(channels, kernel, depth)
        weights = sum(m.weight.size for m in stack if isinstance(m, nn.Conv2d))
        h, w, weight = measured_receptive_field(stack, channels)
        name = f"{depth} x conv{kernel}" if depth > 1 else f"1 x conv{kernel}"
        rows.append((name, weights, weights // channels**2, depth, (h, w), weight))
    return rows


def format_receptive_fields(rows, channels):
    lines = [f"Receptive fields of conv stacks with C = {channels} channels in and out "
             "(Sec. 2.3),",
             "measured as the non-zero support of d(centre output pixel)/d(input):",
             f"{'stack':<11} {'weights':>8} {'= k*C^2':>8} {'ReLUs':>6} {'field':>7}"]
    for name, weights, per_c2, relus, (h, w), _ in rows:
        lines.append(f"{name:<11} {weights:>8} {f'{per_c2}C^2':>8} {relus:>6} {f'{h}x{w}':>7}")
    by_name = {r[0]: r for r in rows}
    three, seven = by_name["3 x conv3"][2], by_name["1 x conv7"][2]
    lines.append(f"Three 3x3 layers see as far as one 7x7, with {three}C^2 instead of "
                 f"{seven}C^2 weights")
    lines.append(f"(the 7x7 has {100 * (seven - three) / three:.0f}% more) and three ReLUs "
                 "instead of one.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# 3. Cost per block
# ----------------------------------------------------------------------------------------

def block_of(layer_name):
    """'conv3_2' and 'pool3' -> 'block 3'; 'fc6' -> 'fc6'; others (relu, flatten) -> None."""
    if layer_name.startswith(("conv", "pool", "norm")):
        return f"block {layer_name[4]}"  # conv3_2, pool3, norm1: the digit after 4 letters
    if layer_name.startswith("fc"):
        return layer_name
    return None


def block_costs(config, input_size=224):
    """OrderedDict {block: (parameters, multiply-adds)} for one image, from `layer_table`."""
    rows = layer_table(VGG(config, input_size=input_size), input_size)
    costs = OrderedDict()
    for r in rows:
        block = block_of(r.name)
        if block is None:
            continue
        params, macs = costs.get(block, (0, 0))
        costs[block] = (params + r.params, macs + r.macs)
    return costs


def format_block_costs(config, costs, input_size=224):
    total_p = sum(p for p, _ in costs.values())
    total_m = sum(m for _, m in costs.values())
    lines = [f"VGG {config}: parameters and multiply-adds per block (one {input_size}x"
             f"{input_size} image; "
             "1 MAC = 2 FLOPs)",
             f"{'block':<8} {'params':>13} {'% params':>9} {'GMACs':>7} {'% MACs':>7}"]
    for block, (p, m) in costs.items():
        lines.append(f"{block:<8} {p:>13,} {100 * p / total_p:>8.1f}% {m / 1e9:>7.3f} "
                     f"{100 * m / total_m:>6.1f}%")
    lines.append(f"{'total':<8} {total_p:>13,} {100.0:>8.1f}% {total_m / 1e9:>7.3f} "
                 f"{100.0:>6.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# PNGs (matplotlib optional)
# ----------------------------------------------------------------------------------------

def plot_block_costs(all_costs, path, plt, input_size=224):
    """Grouped bars: parameters (millions) and GMACs per block, one bar per config."""
    blocks = list(next(iter(all_costs.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(all_costs)
    x = np.arange(len(blocks))
    for i, (config, costs) in enumerate(all_costs.items()):
        params = [costs.get(b, (0, 0))[0] / 1e6 for b in blocks]
        macs = [costs.get(b, (0, 0))[1] / 1e9 for b in blocks]
        axes[0].bar(x + i * width, params, width, label=config)
        axes[1].bar(x + i * width, macs, width, label=config)
    for ax, ylabel, title in ((axes[0], "parameters (millions)", "where the weights are"),
                              (axes[1], "multiply-adds per image (G)", "where the compute is")):
        ax.set_xticks(x + width * (len(all_costs) - 1) / 2, blocks)
        ax.set(ylabel=ylabel, title=title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(title="config", fontsize=8)
    fig.suptitle(f"VGG at {input_size}x{input_size}: parameters and multiply-adds per block")
    fig.tight_layout()
    save_figure(fig, path)


def plot_receptive_fields(rows, path, plt):
    """One panel per stack: |d(centre output)/d(input pixel)|, white where it is zero.

    The field of a 3×3 stack is as wide as the big kernel's, but its weight piles up in the
    middle (many paths lead there), unlike a single 7×7 layer's.
    """
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.4))
    for ax, (name, weights, per_c2, relus, (h, w), weight) in zip(axes, rows):
        ax.imshow(weight / weight.max(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(np.arange(-0.5, weight.shape[1], 1), minor=True)
        ax.set_yticks(np.arange(-0.5, weight.shape[0], 1), minor=True)
        ax.grid(which="minor", color="grey", linewidth=0.3)
        rows_nz, cols_nz = np.nonzero(weight > 0)  # outline the measured field in red
        ax.add_patch(plt.Rectangle((cols_nz.min() - 0.5, rows_nz.min() - 0.5), w, h,
                                   fill=False, edgecolor="red", linewidth=1.5))
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_title(f"{name}\n{h}x{w} field, {per_c2}C² weights", fontsize=9)
    fig.suptitle("Receptive field of one output pixel (Sec. 2.3): |gradient| of the centre "
                 "output with respect to each input pixel")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="configurations to show (default: all six of Table 1)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--out-dir", default=".", help="where to write the PNGs")
    parser.add_argument("--no-tables", action="store_true", help="skip the layer tables")
    parser.add_argument("--channels", type=int, default=4,
                        help="C for the receptive-field stacks (weights scale as C^2)")
    args = parser.parse_args(argv)

    if not args.no_tables:
        for config in args.configs:
            print(summary(config, args.input_size))
            print()

    rf_rows = receptive_field_rows(args.channels)
    print(format_receptive_fields(rf_rows, args.channels))
    print()

    all_costs = OrderedDict((c, block_costs(c, args.input_size)) for c in args.configs)
    for config, costs in all_costs.items():
        print(format_block_costs(config, costs, args.input_size))
        print()

    try:
        plt = import_pyplot()
    except ImportError:
        print("matplotlib is not installed: skipping the PNGs (pip install matplotlib)",
              file=sys.stderr)
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "vgg_blocks.png")
        plot_block_costs(all_costs, path, plt, args.input_size)
        print(f"wrote {path}")
        path = os.path.join(args.out_dir, "receptive_fields.png")
        plot_receptive_fields(rf_rows, path, plt)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
