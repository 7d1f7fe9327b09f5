// The memory moves around the convolution GEMMs; twins of kernels/cpu/conv.py's im2col_chunk,
// col2im_chunk, cols_to_nchw and nchw_to_cols, with the same parameters in the same order
// (then the shapes the CPU reads from its arrays).
//
// A chunk is images n0..n1-1 and output rows oy0..oy1-1 of each. Its im2col matrix is
// cols (CKK, P), CKK = C*KH*KW, P = NB*OB*OW with NB = n1 - n0 and OB = oy1 - oy0:
// row c*KH*KW + ky*KW + kx (the (OC, C, KH, KW) weight layout), column (n, oy, ox) counted
// from (n0, oy0). Entry (c, ky, kx; n, oy, ox) holds
//   x[n0 + n, c, (oy0 + oy)*SH - PH + ky, ox*SW - PW + kx]   (0 in the padding),
// so the chunk's convolution is one GEMM, W.reshape(OC, CKK) @ cols -> ycols (OC, P).
#include "common.cuh"

// Thread index i -> (c, ky, kx, n, oy, ox), the flat index of cols:
//   i = ((((c*KH + ky)*KW + kx)*NB + n)*OB + oy)*OW + ox.
// Neighbouring threads write neighbouring columns ox, so the stores coalesce.
template <typename T>
__global__ void im2col_chunk(const T* x, int n0, int n1, int oy0, int oy1, int KH, int KW,
                             int SH, int SW, int PH, int PW, T* cols, int C, int H, int W,
                             int OW) {
    int NB = n1 - n0, OB = oy1 - oy0;
    FOR_EACH_INDEX(i, (long long)C * KH * KW * NB * OB * OW) {
        long long t = i;
        int ox = t % OW; t /= OW;
        int oy = t % OB; t /= OB;
        int n = t % NB; t /= NB;
        int kx = t % KW; t /= KW;
        int ky = t % KH; t /= KH;
        int c = t;
        int iy = (oy0 + oy) * SH - PH + ky;
        int ix = ox * SW - PW + kx;
        bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
        cols[i] = inside ? x[(((long long)(n0 + n) * C + c) * H + iy) * W + ix] : T(0);
    }
}

// The adjoint of im2col_chunk, as a gather: gx[n0:n1] += every cols entry copied from it.
// Thread index i -> (n, c, iy, ix), one input pixel of the chunk's images:
//   i = ((n*C + c)*H + iy)*W + ix,  n counted from n0.
// The pixel was copied to entry (c, ky, kx; n, oy, ox) for every kernel offset with
// iy + PH - ky = (oy0 + oy)*SH and ix + PW - kx = ox*SW, oy in [0, OB), ox in [0, OW).
// The thread sums exactly those and adds the sum to its own pixel: no atomics.
// NOTE: += because a band of output rows shares input rows with the next band.
template <typename T>
__global__ void col2im_chunk(const T* cols, int n0, int n1, int oy0, int oy1, int KH, int KW,
                             int SH, int SW, int PH, int PW, T* gx, int C, int H, int W,
                             int OW) {
    int NB = n1 - n0, OB = oy1 - oy0;
    long long P = (long long)NB * OB * OW;
    FOR_EACH_INDEX(i, (long long)NB * C * H * W) {
        long long t = i;
        int ix = t % W; t /= W;
        int iy = t % H; t /= H;
        int c = t % C; t /= C;
        int n = t;
        T sum = 0;
        for (int ky = 0; ky < KH; ++ky) {
            int ty = iy + PH - ky;  // = (oy0 + oy)*SH when output row oy reads iy via ky
            if (ty < 0 || ty % SH != 0 || ty / SH < oy0 || ty / SH >= oy1) continue;
            int oy = ty / SH - oy0;
            for (int kx = 0; kx < KW; ++kx) {
                int tx = ix + PW - kx;
                if (tx < 0 || tx % SW != 0 || tx / SW >= OW) continue;
                int ox = tx / SW;
                sum += cols[((c * KH + ky) * KW + kx) * P + ((long long)n * OB + oy) * OW + ox];
            }
        }
        gx[(long long)n0 * C * H * W + i] += sum;
    }
}

// y[n0 + n, oc, oy0 + oy, ox] = ycols[oc, (n, oy, ox)] + b[oc]: the GEMM's (OC, P) result
// moved into NCHW, with the bias added on the way (b is zeros for a conv without bias).
// Thread index i -> (n, oc, oy, ox) of the chunk: i = ((n*OC + oc)*OB + oy)*OW + ox.
template <typename T>
__global__ void cols_to_nchw(const T* ycols, const T* b, int n0, int n1, int oy0, int oy1,
                             T* y, int OC, int OH, int OW) {
    int NB = n1 - n0, OB = oy1 - oy0;
    long long P = (long long)NB * OB * OW;
    FOR_EACH_INDEX(i, (long long)NB * OC * OB * OW) {
        long long t = i;
        int ox = t % OW; t /= OW;
        int oy = t % OB; t /= OB;
        int oc = t % OC; t /= OC;
        int n = t;
        long long out = (((long long)(n0 + n) * OC + oc) * OH + oy0 + oy) * OW + ox;
        y[out] = ycols[oc * P + ((long long)n * OB + oy) * OW + ox] + b[oc];
    }
}

// The inverse move: gycols[oc, (n, oy, ox)] = gy[n0 + n, oc, oy0 + oy, ox].
// Thread index i -> (n, oc, oy, ox) of the chunk, as in cols_to_nchw.
template <typename T>
__global__ void nchw_to_cols(const T* gy, int n0, int n1, int oy0, int oy1, T* gycols,
                             int OC, int OH, int OW) {
    int NB = n1 - n0, OB = oy1 - oy0;
    long long P = (long long)NB * OB * OW;
    FOR_EACH_INDEX(i, (long long)NB * OC * OB * OW) {
        long long t = i;
        int ox = t % OW; t /= OW;
        int oy = t % OB; t /= OB;
        int oc = t % OC; t /= OC;
        int n = t;
        long long in = (((long long)(n0 + n) * OC + oc) * OH + oy0 + oy) * OW + ox;
        gycols[oc * P + ((long long)n * OB + oy) * OW + ox] = gy[in];
    }
}
