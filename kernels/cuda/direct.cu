// Direct convolution, 3×3, stride 1, padding 1 (kernels/direct.py); twins of
// kernels/cpu/direct.py's direct_conv and direct_weight_grad, with the same parameters in
// the same order (then the shapes the CPU reads from its arrays).
//
// NOTE: written for clarity and exactness, not speed: `auto` never picks direct
// convolution on the GPU (kernels/winograd.py: auto_algorithm), where cuDNN-style
// implicit GEMM would be the fast route. Every sum runs in a fixed order, so results
// repeat bit for bit.
#include "common.cuh"

// Thread index i -> one output y[n, oc, yy, xx]: i = ((n*OC + oc)*H + yy)*W + xx.
// y = b[oc] + the sum over channels c (in order) of that channel's nine taps, the taps
// outside the image read as zero: the grouping kernels/cpu/direct.py uses (the compiler
// may fuse multiply-adds here, so the bits can differ from the CPU's by rounding).
// W: the filters (OC, C, 3, 3); Wd: the image width.
template <typename T>
__global__ void direct_conv(const T* x, const T* W, const T* b, T* y, int N, int C, int H,
                            int Wd, int OC) {
    FOR_EACH_INDEX(i, (long long)N * OC * H * Wd) {
        int xx = (int)(i % Wd);
        long long r = i / Wd;
        int yy = (int)(r % H);
        r /= H;
        int oc = (int)(r % OC);
        int n = (int)(r / OC);
        T s = b[oc];
        for (int c = 0; c < C; ++c) {
            const T* xc = x + ((long long)n * C + c) * H * Wd;
            const T* w = W + ((long long)oc * C + c) * 9;
            T t = 0;
            for (int ky = 0; ky < 3; ++ky)
                for (int kx = 0; kx < 3; ++kx) {
                    int iy = yy + ky - 1, ix = xx + kx - 1;
                    if (0 <= iy && iy < H && 0 <= ix && ix < Wd)
                        t += w[ky * 3 + kx] * xc[(long long)iy * Wd + ix];
                }
            s += t;
        }
        y[i] = s;
    }
}

// Threads a block of direct_weight_grad may have: the size of its shared partial sums.
// kernels/gpu.py launches THREADS_PER_BLOCK (256, a power of two, as the tree needs).
#define MAX_GRAD_THREADS 1024

// Thread index i -> the terms j = i, i + blockDim, ... of the weight-gradient entry of its
// block b, e = ((oc*C + c)*3 + ky)*3 + kx (a grid-stride loop over the entries when there
// are more than blocks). Entry e sums N·H·W terms gy[n, oc, yy, xx] times
// x[n, c, yy + ky - 1, xx + kx - 1], j = (n*H + yy)*W + xx, in double (neighbouring threads
// read neighbouring pixels); the block's partial sums are then added by a tree in shared
// memory in a fixed order (no atomics): the same inputs give the same bits.
template <typename T>
__global__ void direct_weight_grad(const T* x, const T* gy, T* gW, int N, int C, int H, int W,
                                   int OC) {
    __shared__ double partial[MAX_GRAD_THREADS];
    long long terms = (long long)N * H * W;
    for (long long e = blockIdx.x; e < (long long)OC * C * 9; e += gridDim.x) {
        int kx = (int)(e % 3), ky = (int)(e / 3 % 3);
        int c = (int)(e / 9 % C), oc = (int)(e / 9 / C);
        double s = 0;
        for (long long j = threadIdx.x; j < terms; j += blockDim.x) {
            int xx = (int)(j % W), yy = (int)(j / W % H), n = (int)(j / W / H);
            int iy = yy + ky - 1, ix = xx + kx - 1;
            if (0 <= iy && iy < H && 0 <= ix && ix < W)
                s += (double)gy[(((long long)n * OC + oc) * H + yy) * W + xx] *
                     (double)x[(((long long)n * C + c) * H + iy) * W + ix];
        }
        partial[threadIdx.x] = s;
        __syncthreads();
        for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {  // the fixed tree
            if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
            __syncthreads();
        }
        if (threadIdx.x == 0) gW[e] = (T)partial[0];
        __syncthreads();  // partial[0] is read before the next entry overwrites it
    }
}
