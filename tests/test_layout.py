"""The house rules of the source tree (style.md, "What we take" 7 and 14), checked by parsing.

* Imports point one way: no import circle among the modules of minivgg/ and kernels/ (the
  latter installed as `minivgg.kernels`), counting the imports inside functions too. The
  one loop style.md allows, tensor <-> functional, is not even needed: functional binds
  Tensor's operators itself (`functional._bind_operators`).
* Small pieces: no file over 600 lines, no function over 60 lines, in the packages and in
  the scripts and tests around them (examples/, benchmarks/, tests/) alike.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each package's files are in the source tree: kernels/ installs as minivgg.kernels.
PACKAGES = {"minivgg": os.path.join(REPO, "minivgg"),
            "minivgg.kernels": os.path.join(REPO, "kernels")}
ALLOWED_CYCLES = [{"minivgg.tensor", "minivgg.functional"}]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60
# Held to the size limits too, though not part of the import graph: scripts and tests.
OTHER_FOLDERS = ("examples", "benchmarks", "tests")


def source_files(package):
    """{module name: path} of the .py files of `package` (kernels/ apart from minivgg/)."""
    folder, found = PACKAGES[package], {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            module = ".".join([package] + rel)
            if package == "minivgg" and module.startswith("minivgg.kernels"):
                continue
            found[module] = os.path.join(dirpath, name)
    return found


MODULES = {**source_files("minivgg"), **source_files("minivgg.kernels")}


def imported_modules(path, module):
    """The project modules `module` (at `path`) imports anywhere in its body.

    `from minivgg import nn` is an import of minivgg.nn; `from minivgg.data import X` of
    minivgg.data (and of minivgg.data.X when that is a module). Importing a package for a
    submodule does not count as importing the package's __init__ (that would make every
    package a circle with its own modules).

    NOTE: imports under `if TYPE_CHECKING:` are left out: they never run, they only let a
    reader's editor follow an annotation (the drivers' `dev: Primitives`) back to its class.
    """
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING"):
            block.body = []  # typing only: not an import at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .y import z
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            submodules = [n for n in names if n in MODULES]
            found.update(submodules)
            if len(submodules) < len(names):
                found.add(base)
    return {m for m in found if m in MODULES and m != module}


def import_graph():
    return {m: imported_modules(path, m) for m, path in MODULES.items()}


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert "minivgg.kernels.cpu.conv" in graph and "minivgg.train" in graph
    assert "minivgg.tensor" in graph["minivgg.functional"]
    assert "minivgg.kernels.common" in graph["minivgg.kernels.cpu.conv"]


def test_no_import_circle_besides_tensor_and_functional():
    found = [sorted(c) for c in cycles(import_graph()) if c not in ALLOWED_CYCLES]
    assert found == [], f"import circles: {found}"


def test_models_import_no_weight_reader():
    """torchvision's vgg.py points one way: the loaders import the models, never back."""
    assert not any(m.startswith("minivgg.pretrained")
                   for m in import_graph()["minivgg.models"])


def test_the_checkpoint_file_format_is_a_leaf():
    assert import_graph()["minivgg.checkpoint"] == set()


def python_files(folder):
    """Paths of the .py files under REPO/`folder`, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, folder)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]
    return found


def package_files(package):
    """Paths of the modules of `package` in the import graph (minivgg or minivgg.kernels)."""
    return [path for module, path in MODULES.items()
            if module.startswith("minivgg.kernels") == (package == "minivgg.kernels")]


def oversized(paths):
    """'path: N lines' for every file, and 'path:line name(): N lines' for every function,
    of `paths` over the limits."""
    problems = []
    for path in paths:
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, REPO)
        lines = text.count("\n")
        if lines > MAX_FILE_LINES:
            problems.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    return problems


def test_the_size_check_sees_every_folder():
    assert os.path.join(REPO, "tests", "test_layout.py") in python_files("tests")
    assert os.path.join(REPO, "tests", "support", "standin_cupy.py") in python_files("tests")
    assert os.path.join(REPO, "kernels", "cpu", "conv.py") in package_files("minivgg.kernels")
    assert all(python_files(folder) for folder in OTHER_FOLDERS)


def test_minivgg_files_and_functions_are_small():
    assert oversized(package_files("minivgg")) == []


def test_kernels_files_and_functions_are_small():
    assert oversized(package_files("minivgg.kernels")) == []


@pytest.mark.parametrize("folder", OTHER_FOLDERS)
def test_script_and_test_files_and_functions_are_small(folder):
    assert oversized(python_files(folder)) == []
