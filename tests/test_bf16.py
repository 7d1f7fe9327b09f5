"""bf16 mixed precision (`backend.set_precision("bf16")`): the switch, the ops under it, the
machines without AMX, the GPU's refusal.

Under bf16 every conv algorithm and fc layer is held to float64 (the naive loop, PyTorch in
float64) with the tolerances of tests/conftest.py, set from benchmarks/bf16_accuracy.md and
applied to results divided by their RMS (the measure of that table). Where the algorithm
multiplies the very operands it was given (im2col, direct, fc), it is also held to the
float64 product of the bf16-rounded operands, to fp32 accuracy: that checks that only the
operands are rounded and the sums stay fp32. NOTE: no finite differences here: a bf16
function is a staircase at step 2^-8, so its difference quotients measure the rounding,
not the gradient; the gradients are compared with PyTorch's float64 ones instead.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minivgg import Tensor, backend
from minivgg import functional as F
from minivgg.kernels.cpu.amx_isa import amx_available
from minivgg.kernels.cpu.bf16 import round_to_bf16
from conftest import REPO, TOLERANCES, tensor, to_numpy
from test_ops import naive_conv2d

F32 = np.dtype(np.float32)
CONV_ALGORITHMS = [a for a in backend.CONV_ALGORITHMS if a != "auto"]


def assert_close_bf16(actual, expected, op, what=""):
    """`actual` within TOLERANCES[op] of `expected`, both divided by RMS(expected)."""
    expected = np.asarray(to_numpy(expected), np.float64)
    scale = np.sqrt(np.mean(expected ** 2)) or 1.0
    np.testing.assert_allclose(to_numpy(actual) / scale, expected / scale, err_msg=what,
                               **TOLERANCES[op][F32])


def conv_tolerance(algorithm):
    return {"winograd": "conv2d_winograd_bf16",
            "winograd4": "conv2d_winograd4_bf16"}.get(algorithm, "conv2d_bf16")


def conv_arrays(rng, N=2, C=5, H=9, W=7, OC=4):
    """float32 x (ReLU'd, as a hidden layer sees), He-scaled W, b, an output projection r."""
    x = np.maximum(rng.normal(size=(N, C, H, W)), 0).astype(np.float32)
    Wt = (rng.normal(size=(OC, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(np.float32)
    b = rng.normal(size=OC).astype(np.float32)
    r = rng.normal(size=(N, OC, H, W)).astype(np.float32)
    return x, Wt, b, r


def conv_and_grads(x, Wt, b, r, algorithm="im2col"):
    """(y, gx, gW, gb) of conv2d(x, W, b, 1, 1) with L = sum(y * r), in the current precision."""
    backend.set_conv_algorithm(algorithm)
    xs = [tensor(a, "cpu", requires_grad=True) for a in (x, Wt, b)]
    y = F.conv2d(*xs, 1, 1)
    y.backward(r)
    return [y.data] + [t.grad for t in xs]


# ----------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------

def test_set_precision_names_the_choices_on_a_bad_name():
    with pytest.raises(ValueError, match="'fp16'.*fp32, bf16"):
        backend.set_precision("fp16")
    assert backend.get_precision() == "fp32"
    backend.set_precision("bf16")
    assert backend.get_precision() == "bf16"


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS)
def test_switching_back_to_fp32_gives_the_same_bits_as_never_switching(algorithm, rng):
    x, Wt, b, r = conv_arrays(rng)
    before = conv_and_grads(x, Wt, b, r, algorithm)
    fc_before = F.linear(Tensor(x.reshape(2, -1)), Tensor(rng.normal(size=(3, x[0].size))
                                                          .astype(np.float32))).data
    backend.set_precision("bf16")
    during = conv_and_grads(x, Wt, b, r, algorithm)
    backend.set_precision("fp32")
    after = conv_and_grads(x, Wt, b, r, algorithm)
    for a, c in zip(before, after):
        assert np.array_equal(a, c)
    assert not all(np.array_equal(a, d) for a, d in zip(before[:3], during[:3]))
    assert fc_before.dtype == np.float32


def test_float64_arrays_stay_float64_under_bf16(rng):
    x, Wt, b, r = (a.astype(np.float64) for a in conv_arrays(rng))
    exact = conv_and_grads(x, Wt, b, r)
    backend.set_precision("bf16")
    for a, c in zip(exact, conv_and_grads(x, Wt, b, r)):
        assert a.dtype == np.float64 and np.array_equal(a, c)


# ----------------------------------------------------------------------------------------
# Every conv algorithm and the fc layers, under bf16
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS)
def test_conv2d_bf16_forward_matches_naive_loop(algorithm, rng):
    x, Wt, b, _ = conv_arrays(rng)
    backend.set_precision("bf16")
    backend.set_conv_algorithm(algorithm)
    y = F.conv2d(Tensor(x), Tensor(Wt), Tensor(b), 1, 1)
    assert y.dtype == np.float32
    expected = naive_conv2d(x.astype(np.float64), Wt.astype(np.float64), b, (1, 1), (1, 1))
    assert_close_bf16(y, expected, conv_tolerance(algorithm), algorithm)


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS)
def test_conv2d_bf16_forward_and_backward_match_torch_float64(algorithm, rng, torch):
    x, Wt, b, r = conv_arrays(rng, N=3, C=12, H=10, W=11, OC=9)
    backend.set_precision("bf16")
    ours = conv_and_grads(x, Wt, b, r, algorithm)
    ts = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, Wt, b)]
    yt = torch.nn.functional.conv2d(*ts, stride=1, padding=1)
    yt.backward(torch.from_numpy(r.astype(np.float64)))
    theirs = [yt.detach().numpy()] + [t.grad.numpy() for t in ts]
    for name, a, t in zip(("y", "gx", "gW", "gb"), ours, theirs):
        assert a.dtype == np.float32
        assert_close_bf16(a, t, conv_tolerance(algorithm), f"{algorithm} {name}")


@pytest.mark.parametrize("algorithm", ["im2col", "direct", "blocked"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 4), (1, 40, 6, 5, 33), (3, 3, 17, 16, 20)])
def test_conv2d_bf16_is_the_fp32_sum_of_the_rounded_operands(algorithm, shape, rng):
    """y, gx and gW take bf16(x), bf16(W) and bf16(gy) and sum in fp32: against the float64
    result on the rounded operands they differ by fp32 sums only. gb, a reduction, stays
    fp32: the plain sum of gy."""
    x, Wt, b, r = conv_arrays(rng, *shape)
    backend.set_precision("bf16")
    ours = conv_and_grads(x, Wt, b, r, algorithm)
    backend.set_precision("fp32")
    rounded = [round_to_bf16(a).astype(np.float64) for a in (x, Wt)]
    exact = conv_and_grads(*rounded, b.astype(np.float64),
                           round_to_bf16(r).astype(np.float64), "im2col")
    for name, a, e in zip(("y", "gx", "gW"), ours, exact):
        assert_close_bf16(a, e, "bf16_operands", f"{algorithm} {name}")
    assert_close_bf16(ours[3], r.astype(np.float64).sum(axis=(0, 2, 3)), "bf16_operands")


def test_conv2d_bf16_with_other_strides_and_kernels_runs_im2col_in_bf16(rng):
    x = rng.normal(size=(2, 3, 9, 8)).astype(np.float32)
    Wt = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    backend.set_precision("bf16")
    y = F.conv2d(Tensor(x), Tensor(Wt), None, (2, 1), (1, 0))
    exact = naive_conv2d(round_to_bf16(x).astype(np.float64),
                         round_to_bf16(Wt).astype(np.float64), None, (2, 1), (1, 0))
    assert_close_bf16(y, exact, "bf16_operands")


@pytest.mark.parametrize("n, fin, fout", [(2, 25, 7), (5, 70, 33), (1, 3, 1)])
def test_linear_bf16_matches_torch_float64_and_the_rounded_product(n, fin, fout, rng, torch):
    x, W, b = (rng.normal(size=s).astype(np.float32) for s in ((n, fin), (fout, fin), fout))
    r = rng.normal(size=(n, fout))
    backend.set_precision("bf16")
    xs = [tensor(a, "cpu", requires_grad=True) for a in (x, W, b)]
    y = F.linear(*xs)
    y.backward(r.astype(np.float32))
    ts = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, W, b)]
    yt = torch.nn.functional.linear(*ts)
    yt.backward(torch.from_numpy(r))
    for name, a, t in zip(("y", "gx", "gW", "gb"), [y.data] + [v.grad for v in xs],
                          [yt.detach().numpy()] + [t.grad.numpy() for t in ts]):
        assert a.dtype == np.float32
        assert_close_bf16(a, t, "linear_bf16", name)
    x64, W64 = (round_to_bf16(a).astype(np.float64) for a in (x, W))
    assert_close_bf16(y, x64 @ W64.T + b, "bf16_operands")


@pytest.mark.parametrize("shape, fp32, bf16", [((4, 256, 56, 56), "winograd4", "im2col"),
                                               ((1, 256, 24, 24), "winograd", "im2col"),
                                               ((4, 3, 224, 224), "direct", "direct"),
                                               ((2, 64, 16, 16), "blocked", "blocked")])
def test_auto_runs_im2col_instead_of_winograd_under_bf16(shape, fp32, bf16):
    """Without AMX; with it, every layer runs "blocked" (tests/test_blocked_amx.py)."""
    x, W = np.empty(shape, np.float32), np.empty((64, shape[1], 3, 3), np.float32)
    backend.set_conv_algorithm("auto")
    picked = backend.conv_algorithm_for(x, W, (1, 1), (1, 1))
    if fp32 == "blocked" and picked != "blocked":  # a CPU without AVX-512
        fp32, bf16 = picked, "im2col"
    assert picked == fp32
    backend.set_precision("bf16")
    expected = "blocked" if amx_available()[0] else bf16
    assert backend.conv_algorithm_for(x, W, (1, 1), (1, 1)) == expected


def test_a_bf16_training_step_repeats_bit_for_bit(rng):
    """Same seed, same run: the bf16 GEMMs have a fixed order, like the fp32 ones."""
    from minivgg import models, optim
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])
    backend.set_precision("bf16")
    backend.set_conv_algorithm("auto")
    runs = []
    for _ in range(2):
        backend.manual_seed(0)  # the dropout masks
        model = models.vgg("A", 3, 0.125, 32, 32, init="glorot", seed=0)
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(2):
            loss = F.cross_entropy(model(Tensor(x)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append([p.data.copy() for p in model.parameters()] + [loss.data])
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    assert all(p.dtype == np.float32 for p in runs[0])  # master weights stay fp32


# ----------------------------------------------------------------------------------------
# Without AMX, and on the GPU
# ----------------------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings
    import numpy as np
    from minivgg import Tensor, backend, functional as F
    from minivgg.kernels.cpu import amx_isa
    from minivgg.kernels.cpu.bf16 import round_to_bf16
    if {patch_flags}:  # a CPU with AMX tiles but without their bf16 multiply
        amx_isa.cpu_flags = lambda: {{"avx512f", "amx_tile"}}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8, 8)).astype(np.float32)
    W = rng.normal(size=(5, 6, 3, 3)).astype(np.float32)
    backend.set_precision("bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for algorithm in ("im2col", "winograd", "direct"):
            backend.set_conv_algorithm(algorithm)
            y = F.conv2d(Tensor(x), Tensor(W), None, 1, 1).data
        F.linear(Tensor(x.reshape(2, -1)), Tensor(rng.normal(size=(5, 384)).astype(np.float32)))
    backend.set_conv_algorithm("im2col")
    y = F.conv2d(Tensor(x), Tensor(W), None, 1, 1).data
    backend.set_precision("fp32")
    exact = F.conv2d(Tensor(round_to_bf16(x).astype(np.float64)),
                     Tensor(round_to_bf16(W).astype(np.float64)), None, 1, 1).data
    fp32 = F.conv2d(Tensor(x), Tensor(W), None, 1, 1).data
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print(len(messages))
    print(messages[0] if messages else "")
    print(float(np.abs(y - exact).max() / np.abs(exact).max()))
    print(float(np.abs(y - fp32).max() / np.abs(fp32).max()))
""")


def run_fallback(patch_flags, env_update):
    env = {**os.environ, "PYTHONPATH": REPO, **env_update}
    script = FALLBACK_SCRIPT.format(patch_flags=patch_flags)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    count, message, error_rounded, error_fp32 = out.stdout.strip().split("\n")
    return int(count), message, float(error_rounded), float(error_fp32)


@pytest.mark.parametrize("patch_flags, env, feature", [
    (False, {"MINIVGG_DISABLE_AMX": "1"}, "MINIVGG_DISABLE_AMX"),
    (True, {"MINIVGG_DISABLE_AMX": "0"}, "amx_bf16")])
def test_bf16_without_amx_runs_rounded_operands_in_fp32_and_warns_once(patch_flags, env,
                                                                        feature):
    """A fresh process (the warning is once per process): three conv algorithms and an fc
    layer give one warning that names what is missing, and the numbers are bf16's."""
    count, message, error_rounded, error_fp32 = run_fallback(patch_flags, env)
    assert count == 1
    assert "no faster than fp32 here" in message and feature in message
    assert error_rounded < 1e-5  # the fp32 product of the bf16-rounded operands
    assert error_fp32 > 1e-4     # ... which is not the fp32 convolution


def test_bf16_on_cuda_arrays_raises_and_names_the_cpu(monkeypatch):
    """The GPU keeps fp32/TF32: any op on a device array while bf16 is set raises (checked
    with a stand-in array type registered as "cuda", so it runs without a GPU)."""
    class DeviceArray(np.ndarray):
        pass
    fake = backend.Backend("cuda", np, "minivgg.kernels.cpu", np.asarray, np.asarray)
    monkeypatch.setitem(backend._BACKENDS, DeviceArray, fake)
    a = np.ones((2, 3), np.float32).view(DeviceArray)
    assert backend.kernels_for(a) is not None
    backend.set_precision("bf16")
    with pytest.raises(RuntimeError, match="runs on the CPU only.*set_precision\\('fp32'\\)"):
        F.linear(Tensor(a), Tensor(np.ones((4, 3), np.float32).view(DeviceArray)))


@pytest.mark.gpu
def test_bf16_on_a_real_gpu_raises(rng):
    if not backend.cuda_available():
        pytest.skip("no CUDA GPU visible to CuPy")
    x = tensor(rng.normal(size=(1, 2, 4, 4)), "cuda", np.float32)
    W = tensor(rng.normal(size=(3, 2, 3, 3)), "cuda", np.float32)
    backend.set_precision("bf16")
    with pytest.raises(RuntimeError, match="CPU only"):
        F.conv2d(x, W, None, 1, 1)


# ----------------------------------------------------------------------------------------
# Training: checkpoints stay fp32 and record the precision; a resume keeps it
# ----------------------------------------------------------------------------------------

def test_a_bf16_run_records_its_precision_and_a_resume_keeps_it(tmp_path):
    from minivgg import checkpoint
    from test_train import run_fit
    first = tmp_path / "bf16"
    _, lines = run_fit(first, precision="bf16")
    assert any("bf16 GEMMs" in line for line in lines)
    state, _, meta = checkpoint.load(first / "last.npz")
    assert meta["precision"] == "bf16" and meta["config"]["precision"] == "bf16"
    assert all(a.dtype == np.float32 for a in state.values())
    backend.set_precision("fp32")
    kept, given = tmp_path / "kept", tmp_path / "given"
    run_fit(kept, epochs=2, resume=str(first / "last.npz"))
    assert checkpoint.load(kept / "last.npz")[2]["precision"] == "bf16"
    run_fit(given, epochs=2, precision="fp32", resume=str(first / "last.npz"))
    assert checkpoint.load(given / "last.npz")[2]["precision"] == "fp32"


def test_a_bad_precision_flag_is_a_training_error(tmp_path):
    from minivgg.train import TrainingError
    from test_train import run_fit
    with pytest.raises(TrainingError, match="--precision must be one of fp32, bf16"):
        run_fit(tmp_path, precision="fp16")


# ----------------------------------------------------------------------------------------
# im2col straight into bf16 tiles (kernels/cpu/im2col_bf16.py)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, k, p", [((3, 5, 7, 6), 3, 1), ((1, 7, 13, 11), 3, 1),
                                         ((2, 4, 5, 5), 1, 0), ((2, 40, 4, 3), 3, 1)])
def test_im2col_operand_equals_packing_the_float32_cols(shape, k, p, rng):
    """Written from x, the tiles equal `amx.pack_b` of `im2col_chunk`'s cols (and of cols^T)
    for whole batches, single images and bands of rows (edge tiles in every direction)."""
    from minivgg.kernels.cpu import amx, conv, im2col_bf16
    N, C, H, W = shape
    x = rng.normal(size=shape).astype(np.float32)
    for n0, n1, oy0, oy1 in [(0, N, 0, H), (0, 1, 1, H - 1), (N - 1, N, 0, H)]:
        cols = np.empty((C * k * k, (n1 - n0) * (oy1 - oy0) * W), np.float32)
        conv.im2col_chunk(x, n0, n1, oy0, oy1, k, k, 1, 1, p, p, cols)
        for transposed, want in ((False, amx.pack_b(cols)), (True, amx.pack_b(cols.T))):
            got = im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, k, k, p, p, transposed)
            assert got.shape == want.shape
            assert np.array_equal(got.tiles, want.tiles), (n0, n1, oy0, oy1, transposed)


@pytest.mark.skipif(not amx_available()[0], reason="the fallback's BLAS may sum otherwise")
def test_fc_matmul_in_column_blocks_gives_the_same_bits(rng, monkeypatch):
    """fc6-sized weights are packed a block of columns at a time; the blocks do not change
    a single output bit (each output is one fixed-order sum over K). 70 rows: past
    amx_stream.STREAM_MAX_M, so fc_matmul takes the blocked path, not the stream."""
    from minivgg.kernels.cpu import amx_stream, matmul
    a = rng.normal(size=(70, 300)).astype(np.float32)
    assert a.shape[0] > amx_stream.STREAM_MAX_M
    W = rng.normal(size=(200, 300)).astype(np.float32)
    backend.set_precision("bf16")
    whole = matmul.fc_matmul(a, W.T)
    monkeypatch.setattr(matmul, "FC_PACK_BYTES", 300 * 2 * 64)  # blocks of 64 columns
    assert np.array_equal(matmul.fc_matmul(a, W.T), whole)
    assert np.array_equal(matmul.fc_matmul(a.T.copy().T, W.T), whole)


def test_the_scripts_take_precision_and_default_to_fp32_or_the_stored_one():
    from conftest import load_example
    evaluate, train = load_example("evaluate_imagenet"), load_example("train_imagenet")
    assert evaluate.parse_args(["c.npz", "--data", "d"]).precision == "fp32"
    assert evaluate.parse_args(["c.npz", "--data", "d", "--precision", "bf16"]).precision \
        == "bf16"
    assert train.parse_args([]).precision is None  # fp32, or on resume the stored one
    assert train.parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "fp16"])
