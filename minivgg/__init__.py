"""minivgg: VGG (Simonyan & Zisserman, ICLR 2015) from scratch on NumPy and CuPy.

    import minivgg
    from minivgg import functional as F, nn, optim
    model = minivgg.models.vgg("D")              # Table 1, column D: 138,357,544 parameters

The hand-written kernels live in the top-level `kernels/` folder of the source tree and are
installed as `minivgg.kernels` (see pyproject.toml).
"""

import importlib.util as _ilu
import os as _os
import sys as _sys


def _mount_kernels():
    """Make `minivgg.kernels` the `kernels/` folder that belongs with this `minivgg/`.

    An installed minivgg (a wheel) has the folder mapped already. A source checkout has
    `kernels/` beside `minivgg/`, and we load it under its package name here rather than as
    a top-level `kernels` (a different PyPI project). NOTE: the checkout's own folder wins
    over an editable install of another checkout (`pip install -e` elsewhere, a worktree
    run with PYTHONPATH), which would otherwise pair this minivgg with those kernels.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    here = _os.path.join(root, "kernels", "__init__.py")
    checkout = _os.path.isfile(here) and _os.path.isfile(_os.path.join(root, "pyproject.toml"))
    if not checkout and _ilu.find_spec(__name__ + ".kernels") is not None:
        return
    spec = _ilu.spec_from_file_location(__name__ + ".kernels", here,
                                        submodule_search_locations=[_os.path.dirname(here)])
    module = _ilu.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_mount_kernels()

from minivgg import backend, functional, nn, optim, models, checkpoint  # noqa: E402
from minivgg.tensor import Tensor, Function, no_grad, is_grad_enabled  # noqa: E402
from minivgg.backend import manual_seed, cuda_available  # noqa: E402
from minivgg.gradcheck import gradcheck  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "manual_seed",
           "cuda_available", "gradcheck", "backend", "functional", "nn", "optim", "models",
           "checkpoint"]
