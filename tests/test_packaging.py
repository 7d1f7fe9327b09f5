"""Packaging: `kernels/` imports as `minivgg.kernels`, and minivgg works without CuPy.

Each check runs in a fresh interpreter (outside the repository folder, so a top-level
`kernels` could not be picked up by accident) to see import side effects.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Makes `import cupy` fail in the child, as on a machine without the GPU extra.
BLOCK_CUPY = """
import sys
class _NoCupy:
    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy' (blocked by the test)")
sys.meta_path.insert(0, _NoCupy())
"""


def run_python(code, tmp_path, block_cupy=False):
    code = (BLOCK_CUPY if block_cupy else "") + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_kernels_import_as_minivgg_kernels_not_pypi_kernels(tmp_path):
    out = run_python("""
        import sys, os
        import minivgg.kernels.cpu as cpu
        import minivgg.kernels as k
        print(k.__name__, cpu.__name__)
        print(os.path.realpath(cpu.__file__))
        print("kernels" in sys.modules)
        print(callable(cpu.conv2d_forward) and callable(cpu.sgd_update))
    """, tmp_path)
    names, path, top_level, callables = out.splitlines()
    assert names == "minivgg.kernels minivgg.kernels.cpu"
    assert path == os.path.realpath(os.path.join(REPO, "kernels", "cpu", "__init__.py"))
    assert top_level == "False"  # no top-level `kernels` module was created or imported
    assert callables == "True"


def test_minivgg_imports_and_trains_a_step_without_cupy(tmp_path):
    out = run_python("""
        import numpy as np
        import minivgg
        from minivgg import functional as F, models, optim
        assert "cupy" not in sys.modules
        print(minivgg.cuda_available())
        model = models.vgg("A", num_classes=3, width=1 / 16, fc_width=8, input_size=32)
        opt = optim.SGD(model.parameters())
        loss = F.cross_entropy(model(np.zeros((2, 3, 32, 32), np.float32)), np.array([0, 2]))
        loss.backward()
        opt.step()
        print(np.isfinite(loss.item()))
    """, tmp_path, block_cupy=True)
    assert out.split() == ["False", "True"]


def test_asking_for_cuda_without_cupy_says_what_is_missing(tmp_path):
    out = run_python("""
        import numpy as np
        import minivgg
        from minivgg import models
        for call in (lambda: minivgg.Tensor(np.ones(2)).to("cuda"),
                     lambda: models.vgg("A", width=1 / 16, fc_width=8, input_size=32).to("cuda"),
                     lambda: minivgg.backend.check_device("cuda:0")):
            try:
                call()
            except RuntimeError as e:
                print("RuntimeError:", e)
            else:
                print("no error")
    """, tmp_path, block_cupy=True)
    lines = out.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("RuntimeError: device 'cuda'")
        assert "cupy" in line.lower() and "not available" in line
        assert "pip install" in line  # and how to get it


def test_importing_minivgg_does_not_import_cupy_eagerly(tmp_path):
    out = run_python("""
        import sys, minivgg
        print("cupy" in sys.modules)
    """, tmp_path)
    assert out.strip() == "False"


def test_pyproject_installs_kernels_folder_as_minivgg_kernels():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    setuptools = project["tool"]["setuptools"]
    assert "minivgg.kernels" in setuptools["packages"]
    assert setuptools["package-dir"]["minivgg.kernels"] == "kernels"
    # every subpackage of kernels/ (a folder with an __init__.py) is installed too
    for sub in sorted(os.listdir(os.path.join(REPO, "kernels"))):
        if os.path.exists(os.path.join(REPO, "kernels", sub, "__init__.py")):
            assert setuptools["package-dir"][f"minivgg.kernels.{sub}"] == f"kernels/{sub}"
            assert f"minivgg.kernels.{sub}" in setuptools["packages"]
    assert "kernels" not in setuptools["packages"]
    deps = " ".join(project["project"]["dependencies"])
    assert "cupy" not in deps and "torch" not in deps  # both optional


def test_weight_readers_without_the_weights_extra_say_what_to_install(tmp_path):
    """protobuf and safetensors are the optional `weights` extra; .npz needs NumPy only."""
    out = run_python("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("google", "safetensors"):
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
        sys.meta_path.insert(0, _Block())
        import numpy as np
        from minivgg import models, pretrained
        model = models.vgg("A", width=1 / 16, fc_width=8, input_size=32)
        pretrained.save_pretrained(model, "a.npz")
        print(pretrained.load_pretrained("a.npz").config)
        open("net.caffemodel", "wb").write(b"\\x0a\\x03VGG\\x12\\x09\\x22\\x07conv1_1")
        for path in ("net.caffemodel", "a.safetensors"):
            try:
                if path.endswith(".safetensors"):
                    pretrained.save_pretrained(model, path)
                else:
                    pretrained.load_pretrained(path)
            except ImportError as e:
                print("ImportError:", e)
    """, tmp_path)
    lines = out.splitlines()
    assert lines[0] == "A" and len(lines) == 3
    for line, package in zip(lines[1:], ("protobuf", "safetensors")):
        assert line.startswith("ImportError:") and f"pip install {package}" in line
        assert "minivgg[weights]" in line


def test_pyproject_declares_the_weights_extra_and_tests_install_it():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    extras = project["project"]["optional-dependencies"]
    names = {spec.split(">")[0].split("=")[0] for spec in extras["weights"]}
    assert names == {"protobuf", "safetensors"}
    assert names <= {spec.split(">")[0].split("=")[0] for spec in extras["test"]}
    assert "minivgg.pretrained" in project["tool"]["setuptools"]["packages"]
