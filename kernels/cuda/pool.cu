// Max-pooling over KH x KW windows with stride (SH, SW), no padding, floor mode
// (Sec. 2.1: 2x2, stride 2). Twins of kernels/cpu/pool.py's max_pool2d_forward / _backward.
// argmax holds the winner's offset ky*KW + kx inside its window.
#include "common.cuh"

// Thread index i -> (n, c, oy, ox), one output: i = ((n*C + c)*OH + oy)*OW + ox.
// NOTE: strict `>` keeps the first maximum in row-major order on a tie, as the CPU kernel
// (and Caffe and cuDNN) do, so the gradient goes to exactly one input.
template <typename T>
__global__ void max_pool2d_forward(const T* x, T* y, int* argmax, int N, int C, int H, int W,
                                   int KH, int KW, int SH, int SW, int OH, int OW) {
    FOR_EACH_INDEX(i, (long long)N * C * OH * OW) {
        long long t = i;
        int ox = t % OW; t /= OW;
        int oy = t % OH; t /= OH;
        const T* plane = x + t * H * W;  // t = n*C + c
        T best = plane[(oy * SH) * W + ox * SW];
        int best_k = 0;
        for (int ky = 0; ky < KH; ++ky) {
            for (int kx = 0; kx < KW; ++kx) {
                T v = plane[(oy * SH + ky) * W + ox * SW + kx];
                if (v > best) {
                    best = v;
                    best_k = ky * KW + kx;
                }
            }
        }
        y[i] = best;
        argmax[i] = best_k;
    }
}

// Thread index i -> (n, c, iy, ix), one input pixel: i = ((n*C + c)*H + iy)*W + ix.
// A gather: the thread visits every window (oy, ox) that covers its pixel, i.e.
// oy*SH <= iy < oy*SH + KH, and adds gy[oy, ox] where that window chose the pixel.
// Overlapping windows (stride < kernel) need no atomics this way. Pixels that no window
// covers (the floor-mode remainder) get 0.
template <typename T>
__global__ void max_pool2d_backward(const T* gy, const int* argmax, T* gx, int N, int C,
                                    int H, int W, int KH, int KW, int SH, int SW,
                                    int OH, int OW) {
    FOR_EACH_INDEX(i, (long long)N * C * H * W) {
        long long t = i;
        int ix = t % W; t /= W;
        int iy = t % H; t /= H;
        long long plane = t * OH * OW;  // t = n*C + c
        // smallest oy with oy*SH + KH > iy, largest with oy*SH <= iy (clipped to [0, OH))
        int oy_lo = iy < KH ? 0 : (iy - KH) / SH + 1;
        int oy_hi = min(iy / SH, OH - 1);
        int ox_lo = ix < KW ? 0 : (ix - KW) / SW + 1;
        int ox_hi = min(ix / SW, OW - 1);
        T sum = 0;
        for (int oy = oy_lo; oy <= oy_hi; ++oy) {
            for (int ox = ox_lo; ox <= ox_hi; ++ox) {
                int k = (iy - oy * SH) * KW + (ix - ox * SW);  // this pixel's offset in window
                long long o = plane + oy * OW + ox;
                if (argmax[o] == k) sum += gy[o];
            }
        }
        gx[i] = sum;
    }
}
