// Direct convolution, 3×3, stride 1, padding 1 (kernels/direct.py); twins of
// kernels/cpu/direct.py's direct_conv and direct_weight_grad, with the same parameters in
// the same order (then the shapes the CPU reads from its arrays).
//
// NOTE: written for clarity and exactness, not speed: `auto` never picks direct
// convolution on the GPU (kernels/winograd.py: auto_algorithm), where cuDNN-style
// implicit GEMM would be the fast route. Each thread sums its outputs alone, in a fixed
// order, so results repeat bit for bit.
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

// Thread index i -> one weight-gradient entry gW[oc, c, ky, kx]: i = ((oc*C + c)*3 + ky)*3 + kx.
// gW = the sum over images, rows and columns (in that order) of gy[n, oc, yy, xx] times
// x[n, c, yy + ky - 1, xx + kx - 1], accumulated in double: N·H·W terms per entry.
// NOTE: only OC·C·9 threads (1,728 for conv1_1), each a long serial sum: exact and
// repeatable, slow on a GPU; a block-wide tree reduction would be the fast version.
template <typename T>
__global__ void direct_weight_grad(const T* x, const T* gy, T* gW, int N, int C, int H, int W,
                                   int OC) {
    FOR_EACH_INDEX(i, (long long)OC * C * 9) {
        int kx = (int)(i % 3), ky = (int)(i / 3 % 3);
        int c = (int)(i / 9 % C), oc = (int)(i / 9 / C);
        double s = 0;
        for (int n = 0; n < N; ++n) {
            const T* xc = x + ((long long)n * C + c) * H * W;
            const T* g = gy + ((long long)n * OC + oc) * H * W;
            for (int yy = 0; yy < H; ++yy) {
                int iy = yy + ky - 1;
                if (iy < 0 || iy >= H) continue;
                for (int xx = 0; xx < W; ++xx) {
                    int ix = xx + kx - 1;
                    if (0 <= ix && ix < W)
                        s += (double)g[(long long)yy * W + xx] * (double)xc[(long long)iy * W + ix];
                }
            }
        }
        gW[i] = (T)s;
    }
}
