// Shared by every kernel in this folder (included by each .cu file).
//
// Launch shape: a 1-D grid of 1-D blocks, one thread per output element. Each kernel's
// header comment says how the flat thread index i maps to (n, c, ...) coordinates; the
// grid-stride loop below lets any grid size cover any element count, so kernels/cuda.py
// can cap the number of blocks. Indices are `long long` so tensors past 2^31 elements
// (a VGG-16 im2col buffer of a whole batch) still index correctly.
#ifndef MINIVGG_COMMON_CUH
#define MINIVGG_COMMON_CUH

#define FOR_EACH_INDEX(i, count)                                                      \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (count); \
         i += (long long)blockDim.x * gridDim.x)

#endif  // MINIVGG_COMMON_CUH
