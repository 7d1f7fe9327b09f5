// Register-blocked direct convolution, 3×3, stride 1, padding 1: the GPU twin of
// kernels/cpu/blocked.py (forward) and kernels/cpu/blocked_grad.py (gradients), launched by
// CudaPrimitives.blocked_conv2d_forward / blocked_conv2d_backward in kernels/gpu.py on NCHW
// arrays (the CPU's nChw16c layout buys vector loads on the CPU; here shared memory does
// the gathering, so the arrays stay NCHW).
//
// Forward (blocked_conv): a block of BLOCKED_THREADS threads computes one tile of
// TILE_H × TILE_W output pixels × TILE_OC output channels of one image. Each thread keeps
// its register block, PIX neighbouring pixels of one row × OCT output channels (16
// accumulators), for the whole C×3×3 reduction; CHUNK_C input channels at a time, the
// input tile with its one-pixel halo (zeros outside the image) and the filter block are
// staged in shared memory, the filters read in their own (oc, c, ky, kx) order so the
// reads are coalesced. Per staged channel and filter row a thread loads PIX + 2 inputs and
// OCT weights per tap, and does PIX·OCT multiply-adds per tap with them.
// Input gradient: the same kernel on gy with the filters turned by 180° and their channel
// axes swapped (kernels/direct.py: rotated_filters).
// Weight gradient (blocked_weight_grad): a block owns 16 output × 16 input channels, a
// thread one (oc, c) pair's nine taps in registers, summed over a fixed range of the
// (image, row) axis: the pixels in row-major order, a window of 3×3 inputs slid along each
// row (three new inputs per pixel). The ranges' partial sums are then added in range order
// (blocked_weight_grad_sum). No atomics anywhere: every sum runs in an order fixed by the
// shapes, so the same inputs give the same bits from run to run.
//
// NOTE: the tile is fixed, so small maps leave threads idle: a 14×14 map fills 196 of the
// 512 pixel slots of its two tiles, a 4×4 map 16 of 256. And it has not been measured on a
// GPU yet: `auto` never picks "blocked" there (kernels/winograd.py: auto_algorithm;
// benchmarks/gpu_notes.md).
#include "common.cuh"

#define TILE_H 8    // output rows of a forward tile
#define TILE_W 32   // output columns of a forward tile
#define TILE_OC 16  // output channels of a forward tile
#define PIX 4       // neighbouring output pixels of one row per thread
#define OCT 4       // output channels per thread
#define CHUNK_C 8   // input channels staged in shared memory at once
// Threads a block must have: one per register block of the tile (kernels/gpu.py launches
// BLOCKED_THREADS, and tests/test_cuda_blocked_emulated.py holds the two equal).
#define BLOCKED_THREADS ((TILE_H * TILE_W / PIX) * (TILE_OC / OCT))
static_assert(TILE_H * TILE_W / PIX == 64 && TILE_W / PIX == 8, "the index map below");

// Thread index i -> one register block of a tile: the block's tile is
// ((n*TY + ty)*TX + tx)*OCB + ob (TY, TX, OCB: tiles down, across, output-channel tiles; a
// grid-stride loop over tiles), and thread i = threadIdx.x holds output channels
// oc = ob*TILE_OC + (i / 64)*OCT + o, o < OCT, of pixels
// y[n, oc, ty*TILE_H + i%64/8, tx*TILE_W + (i%8)*PIX + p], p < PIX.
// y = b[oc] + the sum over c (in order), ky, kx of W[oc, c, ky, kx] · x[n, c, yy+ky-1,
// xx+kx-1], zeros outside the image. W: the filters (OC, C, 3, 3); Wd: the image width.
template <typename T>
__global__ void blocked_conv(const T* x, const T* W, const T* b, T* y, int N, int C, int H,
                             int Wd, int OC) {
    // NOTE: rows of TILE_W + 3 (not + 2): the four rows a warp reads then start in four
    // different banks, so its 32 reads of one tap hit 32 banks (float)
    __shared__ T xs[CHUNK_C][TILE_H + 2][TILE_W + 3];  // the input tile and its halo
    __shared__ T ws[CHUNK_C][9][TILE_OC];              // ws[c][ky*3 + kx][oc]
    const int TY = (H + TILE_H - 1) / TILE_H, TX = (Wd + TILE_W - 1) / TILE_W;
    const int OCB = (OC + TILE_OC - 1) / TILE_OC;
    const int t = threadIdx.x, row = t % 64 / 8, col = t % 8 * PIX, oct = t / 64 * OCT;
    for (long long tile = blockIdx.x; tile < (long long)N * TY * TX * OCB; tile += gridDim.x) {
        const int ob = (int)(tile % OCB), tx = (int)(tile / OCB % TX);
        const int ty = (int)(tile / OCB / TX % TY), n = (int)(tile / OCB / TX / TY);
        const int y0 = ty * TILE_H, x0 = tx * TILE_W, oc0 = ob * TILE_OC;
        T acc[OCT][PIX];
        for (int o = 0; o < OCT; ++o)
            for (int p = 0; p < PIX; ++p) acc[o][p] = 0;
        for (int c0 = 0; c0 < C; c0 += CHUNK_C) {
            for (int s = t; s < CHUNK_C * (TILE_H + 2) * (TILE_W + 2); s += blockDim.x) {
                int q = s % (TILE_W + 2), r = s / (TILE_W + 2) % (TILE_H + 2);
                int c = s / (TILE_W + 2) / (TILE_H + 2), iy = y0 + r - 1, ix = x0 + q - 1;
                bool inside = c0 + c < C && 0 <= iy && iy < H && 0 <= ix && ix < Wd;
                xs[c][r][q] = inside ? x[(((long long)n * C + c0 + c) * H + iy) * Wd + ix] : 0;
            }
            for (int s = t; s < TILE_OC * CHUNK_C * 9; s += blockDim.x) {
                int k = s % 9, c = s / 9 % CHUNK_C, o = s / 9 / CHUNK_C;
                bool inside = oc0 + o < OC && c0 + c < C;
                ws[c][k][o] = inside ? W[((long long)(oc0 + o) * C + c0 + c) * 9 + k] : 0;
            }
            __syncthreads();
            for (int c = 0; c < CHUNK_C; ++c)
                for (int ky = 0; ky < 3; ++ky) {
                    T in[PIX + 2];
                    for (int p = 0; p < PIX + 2; ++p) in[p] = xs[c][row + ky][col + p];
                    for (int kx = 0; kx < 3; ++kx)
                        for (int o = 0; o < OCT; ++o) {
                            T w = ws[c][ky * 3 + kx][oct + o];
                            for (int p = 0; p < PIX; ++p) acc[o][p] += w * in[p + kx];
                        }
                }
            __syncthreads();  // every thread is done with this chunk before the next
        }
        for (int o = 0; o < OCT; ++o) {
            int oc = oc0 + oct + o, yy = y0 + row;
            for (int p = 0; p < PIX; ++p) {
                int xx = x0 + col + p;
                if (oc < OC && yy < H && xx < Wd)
                    y[(((long long)n * OC + oc) * H + yy) * Wd + xx] = b[oc] + acc[o][p];
            }
        }
    }
}

#define GRAD_TILE 16  // output and input channels of a weight-gradient block
#define BAND 4        // rows staged at once
#define SEG 32        // columns staged at once
// NOTE: rows of SEG + 3 (not + 2) so that 16 channels' rows start in 16 different banks
static_assert(GRAD_TILE * GRAD_TILE == BLOCKED_THREADS, "one thread per (oc, c) pair");

// Thread index i -> the nine entries gW[oc, c, 0..2, 0..2] of one (oc, c) pair, summed over
// one range of rows: the block's job is (s*OCB + ob)*CB + cb (a grid-stride loop over
// jobs), thread i = threadIdx.x has oc = ob*GRAD_TILE + i/16, c = cb*GRAD_TILE + i%16, and
// range s holds the rows j = n*H + yy from s*N*H/splits up to (s+1)*N*H/splits; the sum
// gy[n, oc, yy, xx] · x[n, c, yy+ky-1, xx+kx-1] runs over them and their pixels xx in
// order, zeros outside the image, into partial[s, oc, c, ky, kx] (partial: (splits, OC, C,
// 3, 3)).
template <typename T>
__global__ void blocked_weight_grad(const T* x, const T* gy, T* partial, int N, int C, int H,
                                    int Wd, int OC, int splits) {
    __shared__ T xs[GRAD_TILE][BAND + 2][SEG + 3];
    __shared__ T gs[GRAD_TILE][BAND][SEG];
    const int OCB = (OC + GRAD_TILE - 1) / GRAD_TILE, CB = (C + GRAD_TILE - 1) / GRAD_TILE;
    const int t = threadIdx.x, ot = t / GRAD_TILE, ct = t % GRAD_TILE;
    const long long rows = (long long)N * H;
    for (long long job = blockIdx.x; job < (long long)splits * OCB * CB; job += gridDim.x) {
        const int cb = (int)(job % CB), ob = (int)(job / CB % OCB), s = (int)(job / CB / OCB);
        const int oc0 = ob * GRAD_TILE, c0 = cb * GRAD_TILE;
        T acc[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
        const long long j1 = rows * (s + 1) / splits;
        for (long long j = rows * s / splits; j < j1;) {
            const int n = (int)(j / H), y0 = (int)(j % H);  // a band: rows of one image
            const int band = (int)min((long long)min(BAND, H - y0), j1 - j);
            for (int x0 = 0; x0 < Wd; x0 += SEG) {
                const int width = min(SEG, Wd - x0);
                for (int e = t; e < GRAD_TILE * (BAND + 2) * (SEG + 2); e += blockDim.x) {
                    int q = e % (SEG + 2), r = e / (SEG + 2) % (BAND + 2);
                    int c = e / (SEG + 2) / (BAND + 2), iy = y0 + r - 1, ix = x0 + q - 1;
                    bool inside = c0 + c < C && 0 <= iy && iy < H && 0 <= ix && ix < Wd;
                    xs[c][r][q] =
                        inside ? x[(((long long)n * C + c0 + c) * H + iy) * Wd + ix] : 0;
                }
                for (int e = t; e < GRAD_TILE * BAND * SEG; e += blockDim.x) {
                    int q = e % SEG, r = e / SEG % BAND, o = e / SEG / BAND;
                    bool inside = oc0 + o < OC && r < band && q < width;
                    gs[o][r][q] = inside ?
                        gy[(((long long)n * OC + oc0 + o) * H + y0 + r) * Wd + x0 + q] : 0;
                }
                __syncthreads();
                for (int r = 0; r < band; ++r) {
                    T win[3][3];  // x around the pixel q: win[ky][kx] = xs[ct][r+ky][q+kx]
                    for (int ky = 0; ky < 3; ++ky) {
                        win[ky][1] = xs[ct][r + ky][0];
                        win[ky][2] = xs[ct][r + ky][1];
                    }
                    for (int q = 0; q < width; ++q) {
                        T g = gs[ot][r][q];
                        for (int ky = 0; ky < 3; ++ky) {
                            win[ky][0] = win[ky][1];
                            win[ky][1] = win[ky][2];
                            win[ky][2] = xs[ct][r + ky][q + 2];
                            for (int kx = 0; kx < 3; ++kx) acc[ky][kx] += g * win[ky][kx];
                        }
                    }
                }
                __syncthreads();  // the staged band is read before the next overwrites it
            }
            j += band;
        }
        const int oc = oc0 + ot, c = c0 + ct;
        if (oc < OC && c < C)
            for (int k = 0; k < 9; ++k)
                partial[(((long long)s * OC + oc) * C + c) * 9 + k] = acc[k / 3][k % 3];
    }
}

// Thread index i -> one entry gW[i] of the weight gradient, i < count = OC*C*9:
// gW[i] = the sum over s = 0, 1, ..., splits-1 (in that order) of partial[s*count + i].
template <typename T>
__global__ void blocked_weight_grad_sum(const T* partial, T* gW, int splits, int count) {
    FOR_EACH_INDEX(i, count) {
        T s = partial[i];
        for (int k = 1; k < splits; ++k) s += partial[(long long)k * count + i];
        gW[i] = s;
    }
}
