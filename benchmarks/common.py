"""What every benchmark shares: timing, FLOP counts, machine facts and markdown output.

Timing rules (style.md, item 10): every timed function is called `warmup` times first (Numba
loads its cache, BLAS spins up its threads, PyTorch picks its algorithms), the GPU is
synchronised before the clock is read, and minivgg and the reference are measured in the
same run, interleaved (minivgg, reference, minivgg, ...) so a burst of load from another
process hits both. We report medians, which ignore the odd slow repetition.
"""

import datetime
import os
import platform
import subprocess
import sys
import time

# Run from a checkout without installing: put the repository root on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

README = os.path.join(ROOT, "benchmarks", "README.md")


# ----------------------------------------------------------------------------------------
# Threads: the same count for minivgg (BLAS + Numba) and PyTorch
# ----------------------------------------------------------------------------------------

def set_threads(n):
    """Ask every pool for `n` threads. Call before importing numpy, numba or torch.

    NOTE: OpenBLAS and Numba read these variables once, at import; set them too late and
    they are silently ignored.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------

def cuda_sync(device):
    """Wait for the GPU (both CuPy's and PyTorch's streams) so the clock sees the work."""
    if device != "cuda":
        return
    try:
        import cupy
        cupy.cuda.Device().synchronize()
    except ImportError:
        pass
    try:
        import torch
        torch.cuda.synchronize()
    except ImportError:
        pass


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def time_interleaved(fns, repeats=5, warmup=1, device="cpu", raw=False):
    """{name: fn} -> {name: median seconds}, the functions taking turns.

    Each `fn()` runs `warmup` times untimed, then `repeats` timed rounds in which every fn
    runs once, in the order given. With `raw=True`: {name: [seconds of each round]}, for
    `median_ratio`.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        cuda_sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cuda_sync(device)
            t0 = time.perf_counter()
            fn()
            cuda_sync(device)
            times[name].append(time.perf_counter() - t0)
    return times if raw else {name: median(t) for name, t in times.items()}


def median_ratio(numerators, denominators):
    """The median of the per-round ratios a_i / b_i of two interleaved timings.

    NOTE: not median(a) / median(b). On a shared machine the load changes between rounds; a
    round's two measurements share its load, so their ratio cancels it, while a ratio of
    medians can pair a quiet round of one library with a loaded round of the other.
    """
    return median([a / b for a, b in zip(numerators, denominators)])


def gflops(flops, seconds):
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# FLOPs from the Table 1 layers
# ----------------------------------------------------------------------------------------

def layer_rows(config="D", input_size=224, width=1.0, fc_width=4096, num_classes=1000):
    """`minivgg.summary.layer_table` of a configuration: shapes and multiply-adds per image.

    Built with `models.VGG` (zero weights, no initialisation) so it is cheap.
    """
    from minivgg.models import VGG
    from minivgg.summary import layer_table
    model = VGG(config, num_classes, width, fc_width, input_size)
    return model, layer_table(model, input_size)


def training_flops(rows, batch):
    """FLOPs of one training step: forward 2*MACs, backward 4*MACs (gx and gW), except
    that the first conv needs no gx (the image is not trained)."""
    first_conv = next(r.name for r in rows if r.kind.startswith("conv"))
    total = 0
    for r in rows:
        passes = 2 if r.name == first_conv else 3
        total += 2 * r.macs * passes
    return total * batch


# ----------------------------------------------------------------------------------------
# Machine facts and markdown
# ----------------------------------------------------------------------------------------

def cpu_model():
    """The CPU's model name (minivgg's own reading of /proc/cpuinfo, imported late so the
    thread settings above come first)."""
    from minivgg.kernels.cpu import machine
    return machine.cpu_model()


def _getloadavg():
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


# The load when the benchmark started (this module is imported first thing), before our own
# threads add to it.
START_LOAD = _getloadavg()


def load_average():
    """The (1, 5, 15 min) load averages at the start, as text."""
    return "n/a" if START_LOAD is None else "%.2f %.2f %.2f" % START_LOAD


# Above this 1-minute load average the machine is not quiet enough for timings on record.
QUIET_LOAD = 0.5


def quiet_load(device="cpu"):
    """The highest 1-minute load average at which timings on `device` are taken as quiet.

    On the CPU the cores do the work: QUIET_LOAD. On a GPU the host only launches kernels,
    so a few busy cores out of many (the previous benchmark process winding down) do not
    matter; a quarter of the cores busy does.
    """
    return QUIET_LOAD if device == "cpu" else max(QUIET_LOAD, (os.cpu_count() or 1) / 4)


def load_warning(device="cpu"):
    """A warning when the 1-minute load average at the start was above `quiet_load`, else "".

    NOTE: a loaded machine does not slow both libraries alike: PyTorch's OpenMP threads
    spin and wait at barriers, so one descheduled thread stalls the rest, while minivgg's
    pool degrades more gracefully. Timings under load flatter minivgg.
    """
    limit = quiet_load(device)
    if START_LOAD is None or START_LOAD[0] <= limit:
        return ""
    load = START_LOAD[0]
    return (f"WARNING: 1-minute load average {load:.2f} > {limit:g} at start: other "
            "processes share the cores, and a loaded machine flatters minivgg against "
            "PyTorch; do not quote these timings")


def versions():
    import numpy
    parts = [f"Python {platform.python_version()}", f"NumPy {numpy.__version__}"]
    try:
        import numba
        parts.append(f"Numba {numba.__version__}")
    except ImportError:
        pass
    try:
        import torch
        parts.append(f"PyTorch {torch.__version__}")
    except ImportError:
        pass
    try:
        import cupy
        parts.append(f"CuPy {cupy.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def gpu_name():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def header(title, threads, device="cpu"):
    """The lines that open a results section: what, when, where, with what, under what load."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {threads} threads for both libraries"
    if device == "cuda":
        machine += f"; GPU {gpu_name()}"
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    gpu = (["- GPU stack: " + "; ".join(f"{k} {v}" for k, v in gpu_versions()
                                         if not v.startswith("n/a"))]
           if device == "cuda" else [])
    warning = load_warning(device)
    return "\n".join([
        f"### {title}", "",
        f"- date: {now}",
        f"- machine: {machine}",
        f"- versions: {versions()}"] + gpu + [
        f"- load average (1, 5, 15 min) at start: {load_average()}",
        f"- command: `{cmd}`", ""]
        + ([f"**{warning}**", ""] if warning else []))


def gpu_versions():
    """[(what, version or "n/a (why)")] for every GPU library minivgg or the benchmarks use:
    CuPy, the CUDA driver and runtime, NVRTC, the GPU, cuBLAS, NCCL, PyTorch, cuDNN."""
    rows = []

    def add(name, fn):
        try:
            rows.append((name, str(fn())))
        except Exception as e:  # a missing library is a row, not a crash
            rows.append((name, f"n/a ({type(e).__name__}: {e})"))

    def cupy():
        import cupy
        return cupy

    def cuda_version(v):
        return f"{v // 1000}.{v % 1000 // 10}"

    add("CuPy", lambda: cupy().__version__)
    add("CUDA driver (newest CUDA it runs)",
        lambda: cuda_version(cupy().cuda.runtime.driverGetVersion()))
    add("CUDA runtime (CuPy's)", lambda: cuda_version(cupy().cuda.runtime.runtimeGetVersion()))
    add("NVRTC", lambda: ".".join(map(str, cupy().cuda.nvrtc.getVersion())))
    add("GPU", lambda: _device_line(cupy()))
    add("cuBLAS", lambda: cupy().cuda.cublas.getVersion(cupy().cuda.device.get_cublas_handle()))
    add("NCCL (CuPy's)", lambda: _nccl_version(cupy()))
    add("PyTorch", _torch_line)
    add("cuDNN (PyTorch's)", lambda: __import__("torch").backends.cudnn.version())
    return rows


def _device_line(cp):
    d = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(d.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return (f"{name}, compute capability {d.compute_capability}, "
            f"{props['totalGlobalMem'] / 2**30:.0f} GiB, {props['multiProcessorCount']} SMs, "
            f"{cp.cuda.runtime.getDeviceCount()} visible")


def _nccl_version(cp):
    from cupy.cuda import nccl
    v = nccl.get_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _torch_line():
    import torch
    return (f"{torch.__version__} (CUDA {torch.version.cuda}, GPU seen: "
            f"{torch.cuda.is_available()})")


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def run_worker(cmd, what):
    """Run a benchmark worker process `cmd` -> the JSON object on its last output line.

    NOTE: every library is measured in a process of its own, so neither's caches, thread
    pools or allocator state help or hurt the other."""
    import json
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def publish(text, append):
    """Print a results section, and add it to benchmarks/README.md when `append`."""
    print()
    print(text)
    if append:
        append_to_readme(text)


def append_to_readme(text, path=README):
    with open(path, "a") as f:
        f.write("\n" + text.rstrip() + "\n")
    print(f"appended to {os.path.relpath(path, ROOT)}")
