"""Layer tables: output shape, parameters, multiply-adds and receptive field of every layer.

`python -m minivgg summary D` prints one, so Tables 1 and 2 can be checked by eye. Everything
is computed from the layers of a real model (their kernel sizes, strides and weights), not
from a copy of the paper's numbers.
"""

from dataclasses import dataclass

from minivgg import nn
from minivgg.models import VGG, canonical_config, pooled_size


@dataclass
class LayerInfo:
    name: str
    kind: str
    out_shape: tuple  # (C, H, W) or (features,)
    params: int
    macs: int  # multiply-adds for one image
    rf: int  # receptive field side, in input pixels
    jump: int  # distance in input pixels between neighbouring outputs


def layer_table(model, input_size=None):
    """Walk a VGG (or any Sequential of these layers) for one image of `input_size`²."""
    size = input_size or getattr(model, "input_size", 224)
    c, h, w = 3, size, size
    rf, jump = 1, 1
    rows, features = [], None
    for name, layer in model.named_children():
        params = sum(p.size for p in layer.parameters())
        macs = 0
        if isinstance(layer, nn.Conv2d):
            (kh, kw), (s, p) = layer.kernel_size, (layer.stride, layer.padding)
            h, w = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
            c = layer.out_channels
            macs = layer.weight.size * h * w
            rf, jump = rf + (kh - 1) * jump, jump * s
            kind = f"conv{kh}x{kw}"
        elif isinstance(layer, nn.MaxPool2d):
            k = layer.kernel_size
            s = layer.stride or k
            h, w = (h - k) // s + 1, (w - k) // s + 1
            rf, jump = rf + (k - 1) * jump, jump * s
            kind = f"maxpool{k}x{k}"
        elif isinstance(layer, nn.Flatten):
            features = c * h * w
            rf, jump = rf + (max(h, w) - 1) * jump, jump  # fc6 sees the whole map
            kind = "flatten"
        elif isinstance(layer, nn.Linear):
            features = layer.out_features
            macs = layer.weight.size
            kind = "fc"
        else:
            kind = type(layer).__name__.lower()
        shape = (c, h, w) if features is None else (features,)
        rows.append(LayerInfo(name, kind, shape, int(params), int(macs), rf, jump))
    return rows


def format_table(rows, title=""):
    """The table as text, with totals; multiply-adds in millions."""
    head = f"{'layer':<9} {'type':<11} {'output':>16} {'params':>13} {'MMACs':>10} {'RF':>5}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(d) for d in r.out_shape)
        params = f"{r.params:,}" if r.params else ""
        macs = f"{r.macs / 1e6:,.1f}" if r.macs else ""
        lines.append(f"{r.name:<9} {r.kind:<11} {shape:>16} {params:>13} {macs:>10} "
                     f"{r.rf:>5}")
    lines.append("-" * len(head))
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    lines.append(f"{'total':<9} {'':<11} {'':>16} {total_p:>13,} {total_m / 1e6:>10,.1f}")
    return "\n".join(lines)


def summary(config="D", input_size=224, num_classes=1000, width=1.0, fc_width=4096):
    """The layer table of a configuration as a string; the weights are shapes only
    (`nn.shapes_only`), so any size prints without allocating them."""
    name = canonical_config(config)
    if pooled_size(input_size) < 1:
        raise ValueError(f"summary: input_size must be at least 32, got {input_size}")
    with nn.shapes_only():  # NOTE: E at --width 1000 would need 10 TB of weights
        model = VGG(name, num_classes, width, fc_width, input_size)
    title = (f"VGG {name} (Table 1), input 3x{input_size}x{input_size}, width {width}, "
             f"fc {fc_width}, {num_classes} classes")
    return format_table(layer_table(model, input_size), title)


__all__ = ["LayerInfo", "layer_table", "format_table", "summary"]
