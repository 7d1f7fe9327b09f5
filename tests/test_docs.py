"""Docs that cannot drift: every name README.md and docs/*.md quote in code exists.

Inside inline code and fenced code blocks, each dotted `minivgg.…` name is imported and
resolved attribute by attribute, and each `model.<attr>` is looked up on a real VGG (an
attribute, property or method of `minivgg.models.VGG`). Every source path they cite
(`minivgg/train.py`, `benchmarks/data_rate.py`, ...) must exist too. A renamed function, a
moved module or an attribute that never existed (`model.pool_ceil_mode`) fails here, naming
the file and the line.
"""

import glob
import importlib
import os
import re

import pytest

from minivgg import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
DOTTED = re.compile(r"(?<![\w./-])minivgg(?:\.[A-Za-z_]\w*)+")
# model.<attr>, but not a file named model.onnx, model.npz, ...
ATTRIBUTE = re.compile(r"(?<![\w.])model\.(?!(?:onnx|npz|pth|safetensors|caffemodel|png)\b)"
                       r"([A-Za-z_]\w*)")
# A path of the source tree: a folder of the repository, then a file with a source ending.
PATH = re.compile(r"(?<![\w./-])(?:\.\./)?((?:minivgg|kernels|benchmarks|examples|tests|docs)"
                  r"/[\w/.-]*?\.(?:py|md|cu|cuh|sh))\b")
# `model.safetensors` is timm's file name, not an attribute.
FILE_SUFFIXES = {"safetensors", "npz", "pth", "caffemodel", "prototxt", "csv", "png"}


def quoted_names(pattern, in_code=True):
    """[(doc, line, name)] of every match of `pattern` inside code in the docs (anywhere in
    them with `in_code=False`)."""
    found = []
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for code in (CODE.finditer(text) if in_code else [re.match(r".*", text, re.S)]):
            for m in pattern.finditer(code.group(0)):
                line = text.count("\n", 0, code.start() + m.start()) + 1
                name = m.group(1) if pattern in (ATTRIBUTE, PATH) else m.group(0)
                found.append((os.path.relpath(path, REPO), line, name))
    return found


def resolve(dotted):
    """The object `dotted` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_docs_quote_names_to_check():
    assert len(quoted_names(DOTTED)) > 10 and len(quoted_names(ATTRIBUTE)) > 2
    assert len(quoted_names(PATH, in_code=False)) > 20


@pytest.mark.parametrize("doc, line, path", quoted_names(PATH, in_code=False))
def test_every_cited_source_path_exists(doc, line, path):
    folder = os.path.dirname(os.path.join(REPO, doc))  # a link is relative to its doc
    assert (os.path.exists(os.path.join(REPO, path))
            or os.path.exists(os.path.join(folder, path))), f"{doc}:{line} cites {path}"


@pytest.mark.parametrize("doc, line, name", quoted_names(DOTTED))
def test_every_quoted_minivgg_name_exists(doc, line, name):
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{doc}:{line} quotes {name}, which does not exist ({e})")


@pytest.mark.parametrize("doc, line, attr", [q for q in quoted_names(ATTRIBUTE)
                                             if q[2] not in FILE_SUFFIXES])
def test_every_quoted_model_attribute_exists(doc, line, attr):
    model = models.vgg("A", width=1 / 16, fc_width=8, input_size=32)
    assert hasattr(model, attr), f"{doc}:{line} quotes model.{attr}, which VGG does not have"
