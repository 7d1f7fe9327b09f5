// Elementwise kernels: ReLU (Sec. 2.1) and the inverted-dropout mask (Sec. 3.1).
// Twins of kernels/cpu/activation.py's relu_forward, relu_backward and dropout_mask.
#include "common.cuh"

// Thread index i -> element i (the ops are elementwise, so the shape does not matter).
// NOTE: written so that a NaN input stays NaN (visible), as np.maximum, PyTorch and the CPU
// kernel do; `x > 0 ? x : 0` would silently turn it into 0.
template <typename T>
__global__ void relu_forward(const T* x, T* y, long long count) {
    FOR_EACH_INDEX(i, count) {
        y[i] = x[i] <= T(0) ? T(0) : x[i];
    }
}

// Thread index i -> element i.
// NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch: we test y > 0.
template <typename T>
__global__ void relu_backward(const T* y, const T* gy, T* gx, long long count) {
    FOR_EACH_INDEX(i, count) {
        gx[i] = y[i] > T(0) ? gy[i] : T(0);
    }
}

// The i-th output of the SplitMix64 generator started at `seed` (Steele, Lea and Flood,
// 2014): a counter-based random number, a pure function of (seed, i).
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long seed, long long i) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Thread index i -> element i of the mask: 0 with probability p, `scale` = 1/(1-p) otherwise.
// u = the top 24 bits of splitmix64(seed, i) / 2^24, uniform on [0, 1) with float32's
// resolution, like the CPU kernel's float32 draws. The mask depends only on (seed, i), so a
// seed drawn from the host generator makes GPU runs repeatable for any launch shape.
template <typename T>
__global__ void dropout_mask(T* mask, long long count, unsigned long long seed, float p,
                             T scale) {
    FOR_EACH_INDEX(i, count) {
        float u = (float)(splitmix64(seed, i) >> 40) * (1.0f / 16777216.0f);
        mask[i] = u >= p ? scale : T(0);
    }
}
