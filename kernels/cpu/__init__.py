"""The CPU kernel table: NumPy / Numba kernels behind every op in `minivgg.functional`.

One module per op family, mirroring `kernels/cuda/*.cu`:

    runtime.py     the thread pool (`map_ranges`), single-threaded BLAS, workspaces
    conv.py        im2col / col2im chunk kernels, and `CpuPrimitives`: what the shared
                   conv drivers (kernels/common.py, winograd.py, direct.py) call
    pool.py        max-pooling (and ReLU  lrn.py    local response normalisation
                   + max-pooling as one)
    activation.py  ReLU, dropout mask     loss.py   softmax cross-entropy
    sgd.py         the SGD update         matmul.py the GEMMs, fp32 or bf16 (AMX)

This package exports the table's entry points (`common.ENTRY_POINTS`, the same names and
parameters as `kernels/gpu.py`). Set `NUMBA_DISABLE_JIT=1` to run (and step through) every
kernel as plain Python.
"""

from minivgg.kernels.cpu.activation import dropout_mask, relu_backward, relu_forward
from minivgg.kernels.cpu.conv import col2im, conv2d_backward, conv2d_forward, im2col
from minivgg.kernels.cpu.loss import (softmax_cross_entropy_backward,
                                      softmax_cross_entropy_forward)
from minivgg.kernels.cpu.lrn import lrn_backward, lrn_forward
from minivgg.kernels.cpu.matmul import fc_matmul
from minivgg.kernels.cpu.pool import (max_pool2d_backward, max_pool2d_forward,
                                      relu_max_pool2d_backward, relu_max_pool2d_forward)
from minivgg.kernels.cpu.sgd import sgd_update

__all__ = ["col2im", "conv2d_backward", "conv2d_forward", "dropout_mask", "im2col",
           "fc_matmul", "lrn_backward", "lrn_forward", "max_pool2d_backward", "max_pool2d_forward",
           "relu_backward", "relu_forward", "relu_max_pool2d_backward",
           "relu_max_pool2d_forward", "sgd_update", "softmax_cross_entropy_backward",
           "softmax_cross_entropy_forward"]
