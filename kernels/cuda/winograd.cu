// Winograd convolution's transforms (kernels/winograd.py); twins of
// kernels/cpu/winograd.py's tile_transform, output_transform, filter_transform and
// filter_grad_transform, with the same parameters in the same order (then the shapes the
// CPU reads from its arrays). The α² GEMMs between them are cuBLAS's.
//
// A chunk is the tile rows r0..r1-1 (row = n*TH + ty) of TW tiles each, P = (r1 - r0)*TW
// tiles; tile (n, ty, tx) is column q = (row - r0)*TW + tx. Transformed tiles are stored
// (α, α, CH, P): entry (a, b) of channel ch's tile q sits at ((a*α + b)*CH + ch)*P + q,
// so each transform point's slice is a (CH, P) matrix for the GEMM. α = m + 2 <= 6.
#include "common.cuh"

#define MAX_ALPHA 6

// Thread index i -> (ch, q), one window of one tile: i = ch*P + q.
// The thread reads the k×k window of src[n, ch] at row ty*m + shift, column tx*m + shift
// (zeros outside the image) and writes the r×r sandwich L d L^T (L is r×k) to
// out[a, b, ch, q]. Neighbouring threads write neighbouring q, so the stores coalesce.
// Input transform: L = B^T, shift -1; output-gradient transform: L = A, shift 0.
template <typename T>
__global__ void tile_transform(const T* src, const T* L, int m, int shift, int r0, int r1,
                               int TH, int TW, T* out, int CH, int H, int W, int r, int k) {
    long long P = (long long)(r1 - r0) * TW;
    FOR_EACH_INDEX(i, (long long)CH * P) {
        long long q = i % P;
        int ch = (int)(i / P);
        int row = r0 + (int)(q / TW), tx = (int)(q % TW);
        int n = row / TH, ty = row % TH;
        int y0 = ty * m + shift, x0 = tx * m + shift;
        T d[MAX_ALPHA][MAX_ALPHA], t[MAX_ALPHA][MAX_ALPHA];
        for (int u = 0; u < k; ++u)
            for (int v = 0; v < k; ++v) {
                int iy = y0 + u, ix = x0 + v;
                bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
                d[u][v] = inside ? src[(((long long)n * CH + ch) * H + iy) * W + ix] : T(0);
            }
        for (int u = 0; u < k; ++u)  // t = d L^T, along the window rows
            for (int b = 0; b < r; ++b) {
                T s = 0;
                for (int j = 0; j < k; ++j) s += L[b * k + j] * d[u][j];
                t[u][b] = s;
            }
        for (int a = 0; a < r; ++a)  // out = L t, along the window columns
            for (int b = 0; b < r; ++b) {
                T s = 0;
                for (int u = 0; u < k; ++u) s += L[a * k + u] * t[u][b];
                out[((long long)(a * r + b) * CH + ch) * P + q] = s;
            }
    }
}

// Thread index i -> (oc, q), one output tile: i = oc*P + q.
// The thread reads the α×α products M[:, :, oc, q], computes the m×m outputs A^T M A and
// writes those inside the image, plus b[oc], to y (N, OC, H, W).
template <typename T>
__global__ void output_transform(const T* M, const T* AT, int m, int r0, int r1, int TH,
                                 int TW, const T* b, T* y, int OC, int H, int W) {
    int alpha = m + 2;
    long long P = (long long)(r1 - r0) * TW;
    FOR_EACH_INDEX(i, (long long)OC * P) {
        long long q = i % P;
        int oc = (int)(i / P);
        int row = r0 + (int)(q / TW), tx = (int)(q % TW);
        int n = row / TH, ty = row % TH;
        T t[MAX_ALPHA][MAX_ALPHA];
        for (int a = 0; a < alpha; ++a)  // t = M A, along the rows
            for (int j = 0; j < m; ++j) {
                T s = 0;
                for (int v = 0; v < alpha; ++v)
                    s += AT[j * alpha + v] * M[((long long)(a * alpha + v) * OC + oc) * P + q];
                t[a][j] = s;
            }
        for (int u = 0; u < m && ty * m + u < H; ++u)  // y = A^T t, along the columns
            for (int j = 0; j < m && tx * m + j < W; ++j) {
                T s = 0;
                for (int a = 0; a < alpha; ++a) s += AT[u * alpha + a] * t[a][j];
                y[(((long long)n * OC + oc) * H + ty * m + u) * W + tx * m + j] = s + b[oc];
            }
    }
}

// Thread index i -> (o, c), one filter: i = o*I + c.
// U[a, b, o, c] = (G w G^T)[a, b], summed in double, with w = W[o, c] (W is (O, I, 3, 3)),
// or with rotate, w = W[c, o] turned by 180° (W is (I, O, 3, 3)): the input gradient's
// filters. G is α×3, double. Neighbouring threads write neighbouring c.
template <typename T>
__global__ void filter_transform(const T* W, const double* G, int rotate, T* U, int O, int I,
                                 int alpha) {
    FOR_EACH_INDEX(i, (long long)O * I) {
        int c = (int)(i % I), o = (int)(i / I);
        double g[3][3], t[MAX_ALPHA][3];
        for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
                g[ky][kx] = rotate ? (double)W[(((long long)c * O + o) * 3 + 2 - ky) * 3 + 2 - kx]
                                   : (double)W[(((long long)o * I + c) * 3 + ky) * 3 + kx];
        for (int a = 0; a < alpha; ++a)  // t = G g, along the filter columns
            for (int kx = 0; kx < 3; ++kx)
                t[a][kx] = G[a * 3] * g[0][kx] + G[a * 3 + 1] * g[1][kx] + G[a * 3 + 2] * g[2][kx];
        for (int a = 0; a < alpha; ++a)  // U = t G^T, along the rows
            for (int b = 0; b < alpha; ++b)
                U[((long long)(a * alpha + b) * O + o) * I + c] =
                    (T)(G[b * 3] * t[a][0] + G[b * 3 + 1] * t[a][1] + G[b * 3 + 2] * t[a][2]);
    }
}

// Thread index i -> (oc, c), one filter: i = oc*C + c.
// gW[oc, c] = G^T dU[:, :, oc, c] G, summed in double: the adjoint of filter_transform.
template <typename T>
__global__ void filter_grad_transform(const T* dU, const double* G, T* gW, int OC, int C,
                                      int alpha) {
    FOR_EACH_INDEX(i, (long long)OC * C) {
        int c = (int)(i % C), oc = (int)(i / C);
        double t[MAX_ALPHA][3];
        for (int a = 0; a < alpha; ++a)  // t = dU G, along the rows
            for (int kx = 0; kx < 3; ++kx) {
                double s = 0;
                for (int b = 0; b < alpha; ++b) {
                    long long at = ((long long)(a * alpha + b) * OC + oc) * C + c;
                    s += G[b * 3 + kx] * (double)dU[at];
                }
                t[a][kx] = s;
            }
        for (int ky = 0; ky < 3; ++ky)  // gW = G^T t, along the columns
            for (int kx = 0; kx < 3; ++kx) {
                double s = 0;
                for (int a = 0; a < alpha; ++a) s += G[a * 3 + ky] * t[a][kx];
                gW[(((long long)oc * C + c) * 3 + ky) * 3 + kx] = (T)s;
            }
    }
}
