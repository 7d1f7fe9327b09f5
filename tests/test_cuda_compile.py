"""The CUDA half of the kernels, checked without a GPU (this runs in CI).

* Every CUDA source compiles with nvcc for sm_80 (A100) and sm_90 (H100), warnings as errors,
  with every kernel instantiated for float and double as `kernels/gpu.py` asks NVRTC to.
  Skipped only where nvcc is absent.
* The same sources compile through NVRTC the way `cupy.RawModule` compiles them at run time,
  with CuPy's own compiler options (CuPy and nvidia-cuda-nvrtc installed; no GPU needed).
  CI installs both for this test; elsewhere it skips without them.
* `kernels/gpu.py` is a true twin of the `kernels/cpu/` package: both offer the entry points
  of `kernels/common.py`'s ENTRY_POINTS (all the ops call) with the same parameters, their
  primitives classes (`CpuPrimitives`, `CudaPrimitives`) give every method of the contract
  `common.Primitives` with the same parameters, and every kernel gpu.py names exists in its
  `.cu` file with the parameter names of the function that launches it. CuPy need not be
  installed (the stand-in cupy of cuda_host_emulator, and `ast`).
"""

import ast
import inspect
import os
import re
import shutil
import subprocess

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_DIR = os.path.join(ROOT, "kernels")
CUDA_DIR = os.path.join(KERNELS_DIR, "cuda")
ARCHS = ("80", "90")


def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


def _functions(path):
    """{name: ast.FunctionDef} of the module-level functions and the class methods in a
    Python file (a method's `self` left out)."""
    found = {}
    for node in _parse(path).body:
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.args.args:
                    if method.args.args[0].arg == "self":
                        method.args.args = method.args.args[1:]
                    found[method.name] = method
        elif isinstance(node, ast.FunctionDef):
            found[node.name] = node
    return found


def _cuda_kernel_table():
    """The KERNELS dict of kernels/gpu.py: {source file: (kernel names...)}."""
    for node in _parse(os.path.join(KERNELS_DIR, "gpu.py")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KERNELS":
            return ast.literal_eval(node.value)
    raise AssertionError("kernels/gpu.py defines no KERNELS table")


def _table_functions_used_by_ops():
    """Names the engine calls on a kernel table: `backend.kernels_for(x).NAME` or `kern.NAME`
    where `kern = backend.kernels_for(...)`, in every module of minivgg/."""
    used = set()
    package = os.path.join(ROOT, "minivgg")
    for filename in sorted(os.listdir(package)):
        if not filename.endswith(".py"):
            continue
        tree = _parse(os.path.join(package, filename))
        tables = {node.targets[0].id for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, ast.Call)
                  and getattr(node.value.func, "attr", None) == "kernels_for"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if (isinstance(value, ast.Call) and getattr(value.func, "attr", None) == "kernels_for"
                    or isinstance(value, ast.Name) and value.id in tables):
                used.add(node.attr)
    return used


def _signature(fn):
    """Parameter names and default values, as source text."""
    args = fn.args
    defaults = [None] * (len(args.args) - len(args.defaults)) + [
        ast.unparse(d) for d in args.defaults]
    return [(a.arg, d) for a, d in zip(args.args, defaults)]


# ----------------------------------------------------------------------------------------
# The two kernel tables are twins
# ----------------------------------------------------------------------------------------

def test_ops_call_a_known_set_of_kernel_table_functions():
    used = _table_functions_used_by_ops()
    # conv, pooling, ReLU, LRN, dropout, loss and SGD all go through the table
    assert {"conv2d_forward", "conv2d_backward", "max_pool2d_forward", "relu_forward",
            "lrn_backward", "dropout_mask", "softmax_cross_entropy_forward",
            "sgd_update"} <= used, used


def test_both_kernel_tables_offer_the_same_entry_points_with_the_same_signatures():
    """The CPU table (the kernels/cpu package) and the GPU one (kernels/gpu.py, loaded on
    the stand-in cupy; nothing is compiled) each offer every entry point, with the same
    parameters, and the ops call nothing else."""
    from cuda_host_emulator import load_emulated_cuda_kernels

    import minivgg  # noqa: F401  (mounts minivgg.kernels from a checkout)
    from minivgg.kernels import common, cpu
    cuda = load_emulated_cuda_kernels()
    assert _table_functions_used_by_ops() <= set(common.ENTRY_POINTS)
    assert sorted(cpu.__all__) == sorted(common.ENTRY_POINTS)
    for name in common.ENTRY_POINTS:
        assert callable(getattr(cpu, name, None)), f"the CPU table has no {name}()"
        assert callable(getattr(cuda, name, None)), f"kernels/gpu.py has no {name}()"
        want, got = inspect.signature(getattr(cpu, name)), inspect.signature(getattr(cuda, name))
        assert got == want, f"{name}: cuda{got} != cpu{want}"


def test_both_primitives_classes_give_the_contract_with_the_same_signatures():
    """`CpuPrimitives` and `CudaPrimitives` give every method of `common.Primitives` (what
    the shared drivers call as `dev.NAME`), with the contract's parameters, and the drivers
    call nothing else on `dev`."""
    from cuda_host_emulator import load_emulated_cuda_kernels

    import minivgg  # noqa: F401  (mounts minivgg.kernels from a checkout)
    from minivgg.kernels import common
    from minivgg.kernels.cpu import conv as cpu_conv
    gpu = load_emulated_cuda_kernels()
    called = set()
    for filename in ("common.py", "winograd.py", "direct.py"):
        for node in ast.walk(_parse(os.path.join(KERNELS_DIR, filename))):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "dev":
                called.add(node.attr)
    assert called <= set(common.CONTRACT) | {"xp"}, called - set(common.CONTRACT)
    for name in common.CONTRACT:
        contract = getattr(common.Primitives, name)
        for device in (cpu_conv.PRIMITIVES, gpu.PRIMITIVES):
            cls = type(device).__name__
            assert getattr(type(device), name) is not contract, f"{cls} lacks {name}"
            if isinstance(contract, property):
                assert isinstance(getattr(device, name), int), (cls, name)
                continue
            want = inspect.signature(contract.__get__(device))
            got = inspect.signature(getattr(device, name))
            assert got == want, f"{cls}.{name}{got} != Primitives.{name}{want}"


def _kernel_parameters(source):
    """{kernel name: [parameter names]} of every `__global__` function in CUDA source."""
    kernels = {}
    for name, params in re.findall(r"__global__ void (\w+)\(([^)]*)\)", source):
        kernels[name] = [re.search(r"(\w+)\s*$", p).group(1) for p in params.split(",")]
    return kernels


def test_every_cuda_kernel_is_in_the_table_and_shares_the_python_parameter_names():
    table = _cuda_kernel_table()
    cuda = _functions(os.path.join(KERNELS_DIR, "gpu.py"))
    sources = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    assert sorted(table) == sources, "KERNELS must list exactly the .cu files"
    for filename, names in table.items():
        with open(os.path.join(CUDA_DIR, filename)) as f:
            source = f.read()
        kernels = _kernel_parameters(source)
        assert sorted(kernels) == sorted(names), f"{filename}: {sorted(kernels)} != {names}"
        for name in names:
            assert name in cuda, f"kernel {name} has no launching function in gpu.py"
            python_params = {a for a, _ in _signature(cuda[name])}
            # Each argument of the Python function that reaches the kernel keeps its name
            # (x, cols, gy, argmax, KH, SH, size, alpha, ...); shapes are added as N, C, ...
            # (pooling's ceil_mode reaches its kernel as the output size OH, OW).
            shared = python_params & set(kernels[name])
            missing = python_params - set(kernels[name]) - {
                "x_shape", "kernel_size", "stride", "shape", "p", "dtype", "rng", "ceil_mode"}
            assert not missing, f"{name}: kernel lacks parameters {missing} (has {shared})"
            i = source.index(f"__global__ void {name}(")
            header = source[:i].rstrip().rsplit("\n\n", 1)[-1]
            assert "Thread index i ->" in header, (
                f"{filename}: kernel {name} needs a header comment mapping the thread index")


# ----------------------------------------------------------------------------------------
# nvcc
# ----------------------------------------------------------------------------------------

def _nvcc():
    found = shutil.which("nvcc")
    if found is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found


@pytest.mark.parametrize("filename", sorted(_cuda_kernel_table()))
def test_cuda_source_compiles_with_nvcc_for_sm80_and_sm90(filename, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit to compile the kernels)")
    names = _cuda_kernel_table()[filename]
    # Taking each instance's address instantiates the template, as NVRTC's name expressions
    # "im2col<float>" do for cupy.RawModule.
    instances = ", ".join(f"(void*)&{n}<{t}>" for n in names for t in ("float", "double"))
    unit = tmp_path / f"instantiate_{filename}"
    unit.write_text(f'#include "{filename}"\n'
                    f"extern void* const instances[];\n"
                    f"void* const instances[] = {{{instances}}};\n")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    result = subprocess.run(
        [nvcc, *gencode, "-I", CUDA_DIR, "--Werror", "all-warnings", "-fatbin",
         "-o", str(tmp_path / "out.fatbin"), str(unit)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {filename}:\n{result.stderr}"
    assert (tmp_path / "out.fatbin").stat().st_size > 0


def _cupy_compiler():
    """CuPy's compiler module with a loadable libnvrtc, or None (then the test skips).

    CI sets MINIVGG_REQUIRE_NVRTC=1 after installing cupy-cuda13x and nvidia-cuda-nvrtc, so
    a broken install fails there instead of skipping.
    """
    try:
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception:  # no CuPy, or CuPy without libnvrtc (pip install nvidia-cuda-nvrtc)
        if os.environ.get("MINIVGG_REQUIRE_NVRTC") == "1":
            raise
        return None
    return compiler


class _Compiled(Exception):
    """Raised by the spy below with NVRTC's result, before CuPy would load it on a GPU."""


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_sources_compile_with_nvrtc_as_cupy_rawmodule_does(arch, monkeypatch):
    """The path the GPU takes at run time, run up to the GPU: kernels/gpu.py's source text
    and name expressions go through `cupy._core.core.compile_with_cache` with the arguments
    `cupy.RawModule` gives it, so CuPy adds its own options (its include paths, --std=c++17,
    -ftz=true, -arch, --device-as-default-execution-space) and calls NVRTC, which needs no
    GPU. Two things are stubbed: the GPU's architecture (`arch` instead), and loading the
    compiled binary on it (a spy stops there with NVRTC's result).
    """
    compiler = _cupy_compiler()
    if compiler is None:
        pytest.skip("CuPy's NVRTC binding or libnvrtc is not installed")
    import io
    import cupy
    # imports cupy, which is installed if nvrtc loaded
    cuda = load_script(os.path.join(KERNELS_DIR, "gpu.py"), "gpu_table_source")

    nvrtc = compiler._compile_using_nvrtc_no_warning

    def spy(source, options, *args, **kwargs):
        raise _Compiled(options, nvrtc(source, options, *args, **kwargs))

    monkeypatch.setattr(compiler, "_compile_using_nvrtc_no_warning", spy)
    monkeypatch.setattr(compiler, "_get_arch", lambda: arch)
    # NOTE: CuPy asks the driver for the newest arch it supports to choose a cubin over PTX
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # no cached binary to load
    for filename, names in cuda.KERNELS.items():
        expressions = tuple(f"{n}<{t}>" for n in names for t in cuda.C_TYPES.values())
        log = io.StringIO()
        with pytest.raises(_Compiled) as compiled:
            cupy._core.core.compile_with_cache(
                cuda.read_source(filename), (), prepend_cupy_headers=False, backend="nvrtc",
                translate_cucomplex=False, enable_cooperative_groups=False,
                name_expressions=expressions, log_stream=log, jitify=False)
        options, (cubin, mapping) = compiled.value.args
        assert "-ftz=true" in options  # CuPy's own options were used
        assert log.getvalue().strip() == "", f"NVRTC on {filename}:\n{log.getvalue()}"
        assert all(mapping.get(e) for e in expressions), (filename, mapping)
        assert len(cubin) > 0
