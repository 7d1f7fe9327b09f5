// Winograd convolution's transforms (kernels/winograd.py); twins of
// kernels/cpu/winograd.py's tile_transform, output_transform, filter_transform and
// filter_grad_transform, with the same parameters in the same order (then the shapes the
// CPU reads from its arrays). The α² GEMMs between them are cuBLAS's.
//
// A chunk is the tile rows r0..r1-1 (row = n*TH + ty) of TW tiles each, P = (r1 - r0)*TW
// tiles; tile (n, ty, tx) is column q = (row - r0)*TW + tx. Transformed tiles are stored
// (α, α, CH, P): entry (a, b) of channel ch's tile q sits at ((a*α + b)*CH + ch)*P + q,
// so each transform point's slice is a (CH, P) matrix for the GEMM. α = m + 2.
//
// Each kernel reads the tile size m at run time and calls a device function templated on
// it, M = 2 or 4: the tiles' sizes are then compile-time constants, every loop is unrolled
// and the tiles live in registers, not in local memory.
#include "common.cuh"

// The matrices of kernels/winograd.py (BT2, G2, AT2, BT4, G4, AT4), the same values: the
// emulated tests compare these kernels with the CPU's, which reads winograd.py's.
__constant__ double BT2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
__constant__ double G2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
__constant__ double AT2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
__constant__ double BT4[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0},
                                 {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                 {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
__constant__ double G4[6][3] = {{1.0 / 4, 0, 0},
                                {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                {0, 0, 1}};
__constant__ double AT4[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0},
                                 {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

template <int M> __device__ __forceinline__ double BT(int i, int j) {
    if constexpr (M == 2) return BT2[i][j]; else return BT4[i][j];
}
template <int M> __device__ __forceinline__ double G(int i, int j) {
    if constexpr (M == 2) return G2[i][j]; else return G4[i][j];
}
template <int M> __device__ __forceinline__ double AT(int i, int j) {
    if constexpr (M == 2) return AT2[i][j]; else return AT4[i][j];
}
// L of a tile transform: B^T (α×α) for input tiles, A = (A^T)^T (α×m) for gy blocks.
template <int M, bool INPUT> __device__ __forceinline__ double tile_L(int a, int j) {
    if constexpr (INPUT) return BT<M>(a, j); else return AT<M>(j, a);
}

// One tile of tile_transform: read the K×K window (zeros outside the image), write L d L^T.
template <typename T, int M, bool INPUT>
__device__ void transform_tile(const T* src, int shift, int n, int ty, int tx, int ch,
                               long long q, long long P, T* out, int CH, int H, int W) {
    constexpr int R = M + 2, K = INPUT ? M + 2 : M;
    int y0 = ty * M + shift, x0 = tx * M + shift;
    T d[K][K], t[K][R];
#pragma unroll
    for (int u = 0; u < K; ++u)
#pragma unroll
        for (int v = 0; v < K; ++v) {
            int iy = y0 + u, ix = x0 + v;
            bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
            d[u][v] = inside ? src[(((long long)n * CH + ch) * H + iy) * W + ix] : T(0);
        }
#pragma unroll
    for (int u = 0; u < K; ++u)  // t = d L^T, along the window rows
#pragma unroll
        for (int b = 0; b < R; ++b) {
            T s = 0;
#pragma unroll
            for (int j = 0; j < K; ++j) s += (T)tile_L<M, INPUT>(b, j) * d[u][j];
            t[u][b] = s;
        }
#pragma unroll
    for (int a = 0; a < R; ++a)  // out = L t, along the window columns
#pragma unroll
        for (int b = 0; b < R; ++b) {
            T s = 0;
#pragma unroll
            for (int u = 0; u < K; ++u) s += (T)tile_L<M, INPUT>(a, u) * t[u][b];
            out[((long long)(a * R + b) * CH + ch) * P + q] = s;
        }
}

// Thread index i -> (ch, q), one window of one tile: i = ch*P + q.
// The thread reads the window of src[n, ch] at row ty*m + shift, column tx*m + shift and
// writes the α×α sandwich L d L^T to out[a, b, ch, q]. Neighbouring threads write
// neighbouring q, so the stores coalesce. Input transform: L = B^T, shift -1, α×α windows;
// output-gradient transform: L = A, shift 0, the tile's own m×m block of gy.
template <typename T>
__global__ void tile_transform(const T* src, int m, int shift, int r0, int r1, int TH,
                               int TW, T* out, int CH, int H, int W) {
    long long P = (long long)(r1 - r0) * TW;
    FOR_EACH_INDEX(i, (long long)CH * P) {
        long long q = i % P;
        int ch = (int)(i / P);
        int row = r0 + (int)(q / TW), tx = (int)(q % TW);
        int n = row / TH, ty = row % TH;
        if (m == 2 && shift < 0)
            transform_tile<T, 2, true>(src, shift, n, ty, tx, ch, q, P, out, CH, H, W);
        else if (m == 2)
            transform_tile<T, 2, false>(src, shift, n, ty, tx, ch, q, P, out, CH, H, W);
        else if (shift < 0)
            transform_tile<T, 4, true>(src, shift, n, ty, tx, ch, q, P, out, CH, H, W);
        else
            transform_tile<T, 4, false>(src, shift, n, ty, tx, ch, q, P, out, CH, H, W);
    }
}

// One tile of output_transform: A^T M A + b, cropped to the image.
template <typename T, int M>
__device__ void output_tile(const T* Mt, int n, int ty, int tx, int oc, long long q,
                            long long P, T bias, T* y, int OC, int H, int W) {
    constexpr int A = M + 2;
    T t[A][M];
#pragma unroll
    for (int a = 0; a < A; ++a)  // t = M A, along the rows
#pragma unroll
        for (int j = 0; j < M; ++j) {
            T s = 0;
#pragma unroll
            for (int v = 0; v < A; ++v)
                s += (T)AT<M>(j, v) * Mt[((long long)(a * A + v) * OC + oc) * P + q];
            t[a][j] = s;
        }
#pragma unroll
    for (int u = 0; u < M; ++u)  // y = A^T t, along the columns
#pragma unroll
        for (int j = 0; j < M; ++j) {
            T s = 0;
#pragma unroll
            for (int a = 0; a < A; ++a) s += (T)AT<M>(u, a) * t[a][j];
            if (ty * M + u < H && tx * M + j < W)
                y[(((long long)n * OC + oc) * H + ty * M + u) * W + tx * M + j] = s + bias;
        }
}

// Thread index i -> (oc, q), one output tile: i = oc*P + q.
// The thread reads the α×α products M[:, :, oc, q], computes the m×m outputs A^T M A and
// writes those inside the image, plus b[oc], to y (N, OC, H, W).
template <typename T>
__global__ void output_transform(const T* M, int m, int r0, int r1, int TH, int TW,
                                 const T* b, T* y, int OC, int H, int W) {
    long long P = (long long)(r1 - r0) * TW;
    FOR_EACH_INDEX(i, (long long)OC * P) {
        long long q = i % P;
        int oc = (int)(i / P);
        int row = r0 + (int)(q / TW), tx = (int)(q % TW);
        int n = row / TH, ty = row % TH;
        if (m == 2)
            output_tile<T, 2>(M, n, ty, tx, oc, q, P, b[oc], y, OC, H, W);
        else
            output_tile<T, 4>(M, n, ty, tx, oc, q, P, b[oc], y, OC, H, W);
    }
}

// One filter of filter_transform: U[:, :, o, c] = G w G^T in double.
template <typename T, int M>
__device__ void transform_filter(const T* W, int rotate, T* U, int O, int I, int o, int c) {
    constexpr int A = M + 2;
    double g[3][3], t[A][3];
#pragma unroll
    for (int ky = 0; ky < 3; ++ky)
#pragma unroll
        for (int kx = 0; kx < 3; ++kx)
            g[ky][kx] = rotate ? (double)W[(((long long)c * O + o) * 3 + 2 - ky) * 3 + 2 - kx]
                               : (double)W[(((long long)o * I + c) * 3 + ky) * 3 + kx];
#pragma unroll
    for (int a = 0; a < A; ++a)  // t = G g, along the filter columns
#pragma unroll
        for (int kx = 0; kx < 3; ++kx)
            t[a][kx] = G<M>(a, 0) * g[0][kx] + G<M>(a, 1) * g[1][kx] + G<M>(a, 2) * g[2][kx];
#pragma unroll
    for (int a = 0; a < A; ++a)  // U = t G^T, along the rows
#pragma unroll
        for (int b = 0; b < A; ++b)
            U[((long long)(a * A + b) * O + o) * I + c] =
                (T)(G<M>(b, 0) * t[a][0] + G<M>(b, 1) * t[a][1] + G<M>(b, 2) * t[a][2]);
}

// Thread index i -> (o, c), one filter: i = o*I + c.
// U[a, b, o, c] = (G w G^T)[a, b], summed in double, with w = W[o, c] (W is (O, I, 3, 3)),
// or with rotate, w = W[c, o] turned by 180° (W is (I, O, 3, 3)): the input gradient's
// filters. Neighbouring threads write neighbouring c.
template <typename T>
__global__ void filter_transform(const T* W, int m, int rotate, T* U, int O, int I) {
    FOR_EACH_INDEX(i, (long long)O * I) {
        int c = (int)(i % I), o = (int)(i / I);
        if (m == 2)
            transform_filter<T, 2>(W, rotate, U, O, I, o, c);
        else
            transform_filter<T, 4>(W, rotate, U, O, I, o, c);
    }
}

// One filter of filter_grad_transform: gW[oc, c] = G^T dU[:, :, oc, c] G in double.
template <typename T, int M>
__device__ void filter_grad(const T* dU, T* gW, int OC, int C, int oc, int c) {
    constexpr int A = M + 2;
    double t[A][3];
#pragma unroll
    for (int a = 0; a < A; ++a)  // t = dU G, along the rows
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
            double s = 0;
#pragma unroll
            for (int b = 0; b < A; ++b)
                s += G<M>(b, kx) * (double)dU[((long long)(a * A + b) * OC + oc) * C + c];
            t[a][kx] = s;
        }
#pragma unroll
    for (int ky = 0; ky < 3; ++ky)  // gW = G^T t, along the columns
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
            double s = 0;
#pragma unroll
            for (int a = 0; a < A; ++a) s += G<M>(a, ky) * t[a][kx];
            gW[(((long long)oc * C + c) * 3 + ky) * 3 + kx] = (T)s;
        }
}

// Thread index i -> (oc, c), one filter: i = oc*C + c.
// gW[oc, c] = G^T dU[:, :, oc, c] G, summed in double: the adjoint of filter_transform.
template <typename T>
__global__ void filter_grad_transform(const T* dU, int m, T* gW, int OC, int C) {
    FOR_EACH_INDEX(i, (long long)OC * C) {
        int c = (int)(i % C), oc = (int)(i / C);
        if (m == 2)
            filter_grad<T, 2>(dU, gW, OC, C, oc, c);
        else
            filter_grad<T, 4>(dU, gW, OC, C, oc, c);
    }
}
