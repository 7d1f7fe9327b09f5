"""Every output shown in docs/walkthrough.md, produced by the code it describes.

    python examples/walkthrough.py                 # print all sections
    python examples/walkthrough.py im2col maxpool  # print some sections
    python examples/walkthrough.py --check docs/walkthrough.md   # exit 1 if the doc drifted
    python examples/walkthrough.py --update docs/walkthrough.md  # rewrite the doc's outputs

In the walkthrough each output block follows a marker line `<!-- walkthrough.py: NAME -->`
and must equal what section NAME prints here; tests/test_teaching.py checks it, so the doc
cannot drift from the code. Each section is a plain function: read it beside the doc.
"""

import argparse
import contextlib
import inspect
import io
import os
import re
import sys
from collections import OrderedDict

import numpy as np

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXAMPLES))  # the checkout, for `import minivgg`
sys.path.insert(1, EXAMPLES)  # for `import inspect_vgg`

import minivgg  # noqa: E402
from minivgg import checkpoint  # noqa: E402
from minivgg import functional as F  # noqa: E402
from minivgg import nn, optim  # noqa: E402
from minivgg.kernels import cpu as kernels  # noqa: E402
from minivgg.kernels import reference  # noqa: E402
from minivgg.kernels import winograd  # noqa: E402
from minivgg.kernels.cpu import amx  # noqa: E402
from minivgg.kernels.cpu.amx_isa import amx_available  # noqa: E402
from minivgg.kernels.cpu.bf16 import from_bf16, to_bf16  # noqa: E402
from minivgg.models import CONFIGS, VGG, parse_layer, vgg  # noqa: E402
from minivgg.summary import layer_table  # noqa: E402
from minivgg.tensor import Function, Tensor, _topological_order  # noqa: E402

SECTIONS = OrderedDict()


def section(fn):
    """Register a section under its function name, with '_' written as '-'."""
    SECTIONS[fn.__name__.replace("_", "-")] = fn
    return fn


def show(name, a):
    """Print an array under a name, integers without a decimal point."""
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
        a = a.astype(np.int64)
    text = np.array2string(a, precision=4, suppress_small=True, max_line_width=90)
    print(f"{name} =" + ("\n" + text if "\n" in text else " " + text))


# ----------------------------------------------------------------------------------------
# 1. Tensor and autograd (minivgg/tensor.py)
# ----------------------------------------------------------------------------------------

@section
def autograd():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    w = Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    y = (x * w).sum() + (x * x).sum()  # x is used twice: its gradients must add up
    print(f"y = {y.item()}")
    print("backward visits:", " -> ".join(type(f).__name__
                                          for f in _topological_order(y.creator)))
    mul = y.creator.inputs[0].creator.inputs[0].creator  # the Mul that made x * w
    print(f"before backward, x * w saved {len(mul.saved)} arrays for its backward")
    y.backward()
    show("dy/dx", x.grad)  # w + 2x
    show("dy/dw", w.grad)  # x
    print(f"after backward, its saved arrays: {mul.saved}")

    z = x
    for _ in range(10_000):  # far deeper than Python's recursion limit (1000)
        z = z * 1.0001
    x.grad = None
    z.sum().backward()
    show("10,000 multiplications later, dz/dx", x.grad)


# ----------------------------------------------------------------------------------------
# 2. Writing a new op and checking it with minivgg.gradcheck (minivgg/gradcheck.py)
# ----------------------------------------------------------------------------------------

class Softplus(Function):
    """y = log(1 + exp(x)); dy/dx = sigmoid(x)."""

    def forward(self, x):
        self.save_for_backward(x)
        return np.logaddexp(0.0, x)  # log(1 + e^x) without overflow

    def backward(self, gy):
        (x,) = self.saved
        return gy / (1.0 + np.exp(-x))


class BuggySoftplus(Softplus):
    def backward(self, gy):
        (x,) = self.saved
        return gy / (1.0 + np.exp(x))  # sign error: sigmoid(-x)


@section
def gradcheck():
    x = np.random.default_rng(0).normal(size=(3, 4))
    print("Softplus:", minivgg.gradcheck(lambda t: Softplus()(t), [x]))
    try:
        minivgg.gradcheck(lambda t: BuggySoftplus()(t), [x])
    except AssertionError as e:
        print("BuggySoftplus raises AssertionError:")
        print(" ", e)
    x = np.random.default_rng(1).normal(size=(1, 2, 5, 5))
    W = np.random.default_rng(2).normal(size=(3, 2, 3, 3))
    ok = minivgg.gradcheck(lambda x, W: F.conv2d(x, W, padding=1), [x, W])
    print("conv2d 3x3/s1/p1:", ok)


# ----------------------------------------------------------------------------------------
# 3. Convolution by im2col + GEMM (kernels/reference.py, kernels/cpu/conv.py)
# ----------------------------------------------------------------------------------------

SOBEL_X = np.array([[-1, 0, 1],
                    [-2, 0, 2],
                    [-1, 0, 1]], dtype=np.float32)


@section
def im2col_reference():
    print(inspect.getsource(reference.im2col).rstrip())


@section
def im2col():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)  # (N, C, H, W)
    show("x[0, 0]", x[0, 0])
    cols = reference.im2col(x, 3, 3, 1, 1, 0, 0)  # KH, KW, SH, SW, PH, PW
    print(f"cols: shape {cols.shape} = (N, C*KH*KW, OH*OW); column j is output pixel j's "
          "3x3 patch")
    for r in range(9):
        ky, kx = divmod(r, 3)
        print(f"  row {r} (ky={ky}, kx={kx}): {cols[0, r].astype(int).tolist()}")
    W = SOBEL_X.reshape(1, 1, 3, 3)  # (OC, C, KH, KW): a horizontal-gradient filter
    y = (W.reshape(1, 9) @ cols[0]).reshape(2, 2)  # the whole convolution is one GEMM
    show("W.reshape(1, 9) @ cols, reshaped to (OH, OW)", y)
    fast = kernels.im2col(x, 3, 3, 1, 1, 0, 0)  # the chunked Numba kernels, same matrix
    print("kernels.im2col gives the same matrix:", np.array_equal(fast, cols))
    show("F.conv2d(x, W)[0, 0]", F.conv2d(x, W).numpy()[0, 0])
    cols_p = reference.im2col(x, 3, 3, 1, 1, 1, 1)
    print(f"with padding 1: cols shape {cols_p.shape}; output 4x4, the border sees zeros:")
    show("F.conv2d(x, W, padding=1)[0, 0]", F.conv2d(x, W, padding=1).numpy()[0, 0])


@section
def col2im():
    x = Tensor(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), requires_grad=True)
    W = Tensor(np.ones((1, 1, 3, 3), dtype=np.float32), requires_grad=True)
    y = F.conv2d(x, W)
    y.backward(np.ones(y.shape, dtype=np.float32))
    show("dL/dx for W = ones, dL/dy = ones (how many windows read each pixel)", x.grad[0, 0])
    cols = kernels.im2col(x.data, 3, 3, 1, 1, 0, 0)
    show("dL/dW = dL/dy @ cols^T, reshaped (each weight's window sum)",
         W.grad[0, 0])
    show("same, by hand", (np.ones((1, 4)) @ cols[0].T).reshape(3, 3))


# ----------------------------------------------------------------------------------------
# 4. Max-pooling and its argmax backward (kernels/cpu/pool.py)
# ----------------------------------------------------------------------------------------

@section
def maxpool():
    x = np.array([[1, 3, 2, 2],
                  [4, 2, 2, 2],
                  [0, 1, 5, 6],
                  [7, 1, 7, 0]], dtype=np.float32).reshape(1, 1, 4, 4)
    y, argmax = kernels.max_pool2d_forward(x, (2, 2), (2, 2))
    show("x", x[0, 0])
    show("y = max over each 2x2 window", y[0, 0])
    show("argmax = ky*2 + kx of the winner in its window", argmax[0, 0])
    t = Tensor(x, requires_grad=True)
    out = F.max_pool2d(t, 2)
    out.backward(np.array([[10, 20], [30, 40]], dtype=np.float32).reshape(1, 1, 2, 2))
    show("dL/dx for dL/dy = [[10, 20], [30, 40]]", t.grad[0, 0])
    print("the top-right window is a tie (four 2s): the first one in row-major order wins")


# ----------------------------------------------------------------------------------------
# 5. Local response normalisation, and why the paper dropped it (Sec. 2.1, Table 3)
# ----------------------------------------------------------------------------------------

@section
def lrn():
    print("b/a for a (1, 5, 1, 1) input with every channel equal to a "
          "(centre channel, n = 5):")
    print(f"{'a':>7} {'paper: alpha':>13} {'Caffe/PyTorch: alpha/n':>23}")
    for a in (0.1, 1.0, 10.0, 100.0):
        x = np.full((1, 5, 1, 1), a)
        paper = F.local_response_norm(x).numpy()[0, 2, 0, 0] / a
        caffe = F.local_response_norm(x, alpha_over_n=True).numpy()[0, 2, 0, 0] / a
        print(f"{a:>7} {paper:>13.4f} {caffe:>23.4f}")
    print(f"k^-beta = 2^-0.75 = {2.0 ** -0.75:.4f}: for small activations LRN is a constant")

    a, a_lrn = VGG("A", fc_width=16), VGG("A-LRN", fc_width=16)
    print("A-LRN block 1:", " ".join(n for n, _ in a_lrn.named_children() if block_number(n) == 1))
    print(f"extra parameters: {a_lrn.num_parameters() - a.num_parameters()}")
    rows = {r.name: r for r in layer_table(a_lrn, 224)}
    c, h, w = rows["norm1"].out_shape
    saved = 3 * c * h * w * 4  # forward saves x, y and the scale for backward (float32)
    print(f"norm1 output {c}x{h}x{w}; its backward keeps x, y and the scale:")
    print(f"{saved / 2**20:.1f} MiB per 224x224 image, {256 * saved / 2**30:.1f} GiB per "
          "batch of 256 (Sec. 3.1)")


def block_number(name):
    """The block number of a VGG layer name (conv3_1, relu3_1, norm1, pool3), else None."""
    return int(name[4]) if name[4:5] in ("1", "2", "3", "4", "5") else None


def describe(name, module):
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"{name}[{kh}x{kw},{module.in_channels}->{module.out_channels}]"
    if isinstance(module, nn.Linear):
        return f"{name}[{module.in_features}->{module.out_features}]"
    return name


# ----------------------------------------------------------------------------------------
# 6. Table 1 as data, and the factory that builds it (minivgg/models.py)
# ----------------------------------------------------------------------------------------

@section
def table1():
    for b, block in enumerate(CONFIGS["C"], start=1):
        print(f"C, block {b}: {block}")
    for spec in ("conv3-64", "conv1-256", "LRN"):
        print(f"parse_layer({spec!r}) = {parse_layer(spec)}")
    model = VGG("C", width=1 / 16, fc_width=32, num_classes=10, input_size=32)
    print("VGG('C', width=1/16, fc_width=32, num_classes=10, input_size=32) builds "
          "(ReLUs not shown):")
    for b in (1, 2, 3, 4, 5, None):
        print(f"  {'block ' + str(b) if b else 'head':<8}", " ".join(
            describe(n, m) for n, m in model.named_children()
            if block_number(n) == b and not isinstance(m, nn.ReLU)))
    print("Table 2, counted from the built models:")
    for config in CONFIGS:
        print(f"  {config:<5} {VGG(config).num_parameters():>12,}")


@section
def receptive_fields():
    import inspect_vgg  # examples/inspect_vgg.py, beside this file
    print(inspect_vgg.format_receptive_fields(inspect_vgg.receptive_field_rows(4), 4))


@section
def block_costs():
    import inspect_vgg
    print(inspect_vgg.format_block_costs("D", inspect_vgg.block_costs("D")))


# ----------------------------------------------------------------------------------------
# 7. One SGD step (minivgg/optim.py, Sec. 3.1)
# ----------------------------------------------------------------------------------------

@section
def sgd():
    w = nn.Parameter(np.array([1.0, -2.0]))
    opt = optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    v, w_hand = np.zeros(2), w.data.copy()
    for step in (1, 2):
        w.grad = np.array([0.5, 0.5])  # pretend backward() produced this gradient
        opt.step()
        g = w.grad + 5e-4 * w_hand  # the same update by hand
        v = 0.9 * v + g
        w_hand = w_hand - 0.1 * v
        print(f"step {step}: w = {np.round(w.data, 6).tolist()}  by hand: "
              f"{np.round(w_hand, 6).tolist()}")

    minivgg.manual_seed(0)
    model = vgg("A", num_classes=10, width=1 / 16, fc_width=32, input_size=32,
                init="glorot", seed=0)
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    labels = np.arange(8) % 10
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.eval()  # no dropout, so the losses below compare like with like
    for step in range(1, 3):
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"VGG-A (1/16 width), batch of 8, step {step}: loss {loss.item():.4f} before "
              "the update")
    with minivgg.no_grad():
        print(f"after 2 steps: loss {F.cross_entropy(model(x), labels).item():.4f}")


# ----------------------------------------------------------------------------------------
# 8. Winograd: fewer multiplications for 3×3 (kernels/winograd.py)
# ----------------------------------------------------------------------------------------

@section
def winograd_1d():
    d = np.array([1.0, 2.0, 4.0, 7.0])  # four inputs
    g = np.array([1.0, 2.0, 3.0])  # a 3-tap filter
    print("direct, 6 multiplications:", [float(d[0:3] @ g), float(d[1:4] @ g)])
    m1 = (d[0] - d[2]) * g[0]  # Winograd's four products (Lavin & Gray, F(2,3))
    m2 = (d[1] + d[2]) * (g[0] + g[1] + g[2]) / 2
    m3 = (d[2] - d[1]) * (g[0] - g[1] + g[2]) / 2
    m4 = (d[1] - d[3]) * g[2]
    print("F(2,3), 4 multiplications:", [float(m1 + m2 + m3), float(m2 - m3 - m4)])
    BT, G, AT = winograd.transforms(2)  # the same four products as matrices
    show("B^T d  (the input at the points 0, 1, -1, inf)", BT @ d)
    show("G g    (the filter at the same points)", G @ g)
    show("A^T [(G g) * (B^T d)]", AT @ ((G @ g) * (BT @ d)))


@section
def winograd_2d():
    d = np.arange(16, dtype=np.float64).reshape(4, 4)  # one 4×4 input tile
    g = SOBEL_X.astype(np.float64)
    BT, G, AT = winograd.transforms(2)
    V = BT @ d @ BT.T  # input transform
    U = G @ g @ G.T  # filter transform, once per filter
    M = U * V  # 16 multiplications
    show("V = B^T d B", V)
    show("U = G g G^T", U)
    show("Y = A^T (U * V) A", AT @ M @ AT.T)
    show("direct", [[(d[i:i + 3, j:j + 3] * g).sum() for j in range(2)] for i in range(2)])
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 7))  # a whole (odd-sized) layer
    W = np.random.default_rng(1).normal(size=(3, 2, 3, 3))
    y = kernels.conv2d_forward(x, W, None, (1, 1), (1, 1))
    for algorithm, m in winograd.ALGORITHMS.items():
        ours = kernels.conv2d_forward(x, W, None, (1, 1), (1, 1), algorithm)
        print(f"F({m}x{m},3x3) on a 5x7 input, 2->3 channels, equals im2col:",
              np.allclose(ours, y, rtol=1e-12, atol=1e-12))


def conv_multiplications(m, size, C, OC):
    """Multiplications of one 3×3/s1/p1 layer on a size×size input: direct (m = 1) or
    F(m×m, 3×3), whose tiles cover ceil(size/m)² blocks."""
    if m == 1:
        return 9 * size * size * C * OC
    return (m + 2) ** 2 * (-(-size // m)) ** 2 * C * OC


@section
def winograd_cost():
    print("multiplications per output and (input, output) channel pair:")
    for m in winograd.ALGORITHMS.values():
        print(f"  F({m}x{m},3x3): {(m + 2) ** 2} for {m * m} outputs = "
              f"{(m + 2) ** 2 / m ** 2:.2f}, {9 * m * m / (m + 2) ** 2:.2f}x fewer than 9")
    convs = [(parse_layer(s), size) for s, size in
             [("conv3-64", 224), ("conv3-64", 224), ("conv3-128", 112), ("conv3-128", 112)]
             + [("conv3-256", 56)] * 3 + [("conv3-512", 28)] * 3 + [("conv3-512", 14)] * 3]
    totals = {1: 0, 2: 0, 4: 0}
    C = 3
    for (_, _, OC), size in convs:
        for m in totals:
            totals[m] += conv_multiplications(m, size, C, OC)
        C = OC
    print("VGG-16's 13 conv layers, one 224x224 image, in billions of multiplications:")
    for m, name in [(1, "direct / im2col"), (2, "F(2x2,3x3)"), (4, "F(4x4,3x3)")]:
        print(f"  {name:16s} {totals[m] / 1e9:6.2f}  ({totals[1] / totals[m]:.2f}x fewer)")


@section
def winograd_accuracy():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 256, 28, 28)), 0)  # ReLU'd inputs of conv4_1
    W = rng.normal(size=(512, 256, 3, 3)) * np.sqrt(2 / (9 * 256))
    exact = kernels.conv2d_forward(x, W, None, (1, 1), (1, 1))  # float64
    x32, W32 = x.astype(np.float32), W.astype(np.float32)
    results = {"im2col": kernels.conv2d_forward(x32, W32, None, (1, 1), (1, 1))}
    for algorithm, m in winograd.ALGORITHMS.items():
        results[f"F({m}x{m},3x3)"] = kernels.conv2d_forward(x32, W32, None, (1, 1), (1, 1),
                                                            algorithm)
    print("conv4_1 (256 -> 512 channels, 28x28) in float32 against float64,")
    print("max |error| / RMS(output):")
    for name, y in results.items():
        error = np.abs(y - exact).max() / np.sqrt((exact ** 2).mean())
        bound = next(b for b in (1e-6, 1e-5, 1e-4, 1e-3) if error < b)
        print(f"  {name:12s} below {bound:.0e}")


@section
def bf16_bits():
    x = np.float32(np.pi)
    bits = int(x.view(np.uint32))
    rounded = int(to_bf16(x)[0])
    value = from_bf16(np.uint16(rounded))

    def fields(b, mantissa_bits):
        text = f"{b:0{9 + mantissa_bits}b}"
        return f"{text[0]} {text[1:9]} {text[9:]}"
    print(f"pi as float32: {x:.8f}")
    print(f"  float32 bits  {fields(bits, 23)}   sign, 8 exponent, 23 mantissa")
    print(f"  bf16 bits     {fields(rounded, 7)}           the top 16, rounded to nearest")
    print(f"  bf16 value    {float(value):.8f}   relative error {abs(value - x) / x:.1e}")
    print(f"bf16's unit roundoff 2^-8 = {2.0 ** -8:.1e}; float32's 2^-24 = {2.0 ** -24:.1e}")


@section
def vnni_layout():
    B = np.arange(1, 13, dtype=np.float32).reshape(4, 3)  # K = 4 rows, N = 3 columns
    tile = amx.pack_b(B).tiles[0, 0]  # (16 pair rows, 16 columns, 2): the first B tile
    print("B (K=4 x N=3):")
    print(B.astype(int))
    print("its B tile, pair rows p = 0, 1 (row p holds K rows 2p and 2p+1, interleaved),")
    print("first 3 of 16 columns, as (B[2p, j], B[2p+1, j]) pairs:")
    for p in range(2):
        pairs = [tuple(int(v) for v in from_bf16(tile[p, j])) for j in range(3)]
        print(f"  p={p}: " + "  ".join(f"({a:2d},{b:2d})" for a, b in pairs))


@section
def tile_multiply():
    A = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)   # M = 2, K = 4
    B = np.arange(1, 13, dtype=np.float32).reshape(4, 3)     # K = 4, N = 3
    terms = " + ".join(f"{A[0, 2 * p]:.0f}*{B[2 * p, 0]:.0f} + {A[0, 2 * p + 1]:.0f}*"
                       f"{B[2 * p + 1, 0]:.0f}" for p in range(2))
    print(f"C[0, 0] = sum over pairs p: {terms} = {(A @ B)[0, 0]:.0f}")
    print("gemm_bf16(A, B), fp32 sums of bf16 products (AMX tiles, or their fallback):")
    print(amx.gemm_bf16(A, B, amx=None if amx_available()[0] else False).astype(int))


# ----------------------------------------------------------------------------------------
# Running sections and keeping the doc in step
# ----------------------------------------------------------------------------------------

MARKER = re.compile(r"<!-- walkthrough\.py: ([\w-]+) -->\n```text\n(.*?)```", re.DOTALL)


def output_of(name):
    """What section `name` prints, as one string ending in a newline."""
    buf = io.StringIO()
    previous = np.get_printoptions()
    np.set_printoptions(precision=4, suppress=True)
    try:
        with contextlib.redirect_stdout(buf):
            SECTIONS[name]()
    finally:
        np.set_printoptions(**previous)
    return buf.getvalue()


def doc_blocks(markdown):
    """[(name, shown output)] for every marked output block of the walkthrough."""
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(markdown)]


def check(path):
    """Names of the sections whose shown output differs from what they print now."""
    with open(path, encoding="utf-8") as f:
        blocks = doc_blocks(f.read())
    return [name for name, shown in blocks if name not in SECTIONS or output_of(name) != shown]


def update(path):
    """Rewrite every marked block of the doc with the section's current output."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = MARKER.sub(lambda m: f"<!-- walkthrough.py: {m.group(1)} -->\n```text\n"
                                f"{output_of(m.group(1))}```", text)
    checkpoint.write_bytes(path, text.encode("utf-8"), overwrite=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", help=f"any of: {', '.join(SECTIONS)}")
    parser.add_argument("--check", metavar="DOC", help="compare the doc's outputs")
    parser.add_argument("--update", metavar="DOC", help="rewrite the doc's outputs")
    args = parser.parse_args(argv)
    if args.check:
        stale = check(args.check)
        print(f"{args.check}: " + (f"out of date: {', '.join(stale)}" if stale else "up to date"))
        return 1 if stale else 0
    if args.update:
        update(args.update)
        print(f"updated {args.update}")
        return 0
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    for name in args.sections or SECTIONS:
        print(f"--- {name} ---")
        print(output_of(name), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
