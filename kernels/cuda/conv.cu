// im2col and col2im: the memory shuffles around the convolution GEMMs.
// Twins of kernels/cpu.py's im2col / col2im; same names, same layout:
//   x    (N, C, H, W)
//   cols (N, C*KH*KW, OH*OW), row c*KH*KW + ky*KW + kx, column oy*OW + ox,
// so cols viewed as (N, C, KH, KW, OH, OW) holds cols[n, c, ky, kx, oy, ox] =
//   x[n, c, oy*SH - PH + ky, ox*SW - PW + kx]   (0 where that falls in the padding).
#include "common.cuh"

// Thread index i -> (n, c, ky, kx, oy, ox), the flat index of cols itself:
//   i = ((((n*C + c)*KH + ky)*KW + kx)*OH + oy)*OW + ox.
// Neighbouring threads write neighbouring columns ox, so the stores coalesce.
template <typename T>
__global__ void im2col(const T* x, T* cols, int N, int C, int H, int W,
                       int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW) {
    FOR_EACH_INDEX(i, (long long)N * C * KH * KW * OH * OW) {
        long long t = i;
        int ox = t % OW; t /= OW;
        int oy = t % OH; t /= OH;
        int kx = t % KW; t /= KW;
        int ky = t % KH; t /= KH;
        long long nc = t;  // n*C + c
        int iy = oy * SH - PH + ky;
        int ix = ox * SW - PW + kx;
        bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
        cols[i] = inside ? x[(nc * H + iy) * W + ix] : T(0);
    }
}

// The adjoint of im2col, as a gather: cols (N, C*KH*KW, OH*OW) -> gx (N, C, H, W).
// Thread index i -> (n, c, iy, ix), one input pixel: i = ((n*C + c)*H + iy)*W + ix.
// The pixel was copied to cols[n, c, ky, kx, oy, ox] for every kernel offset (ky, kx)
// with iy + PH - ky = oy*SH for a whole oy in [0, OH) (and likewise along x). The
// thread sums exactly those entries and writes only its own pixel: no atomics, and the
// sum runs in the same (ky, kx) order as the CPU loop.
template <typename T>
__global__ void col2im(const T* cols, T* gx, int N, int C, int H, int W,
                       int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW) {
    FOR_EACH_INDEX(i, (long long)N * C * H * W) {
        long long t = i;
        int ix = t % W; t /= W;
        int iy = t % H; t /= H;
        long long nc = t;  // n*C + c
        T sum = 0;
        for (int ky = 0; ky < KH; ++ky) {
            int ty = iy + PH - ky;  // = oy*SH when window row oy covers iy at offset ky
            if (ty < 0 || ty % SH != 0 || ty / SH >= OH) continue;
            int oy = ty / SH;
            for (int kx = 0; kx < KW; ++kx) {
                int tx = ix + PW - kx;
                if (tx < 0 || tx % SW != 0 || tx / SW >= OW) continue;
                int ox = tx / SW;
                sum += cols[(((nc * KH + ky) * KW + kx) * OH + oy) * OW + ox];
            }
        }
        gx[i] = sum;
    }
}
