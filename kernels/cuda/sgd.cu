// SGD with momentum and weight decay (Sec. 3.1), PyTorch's convention, as in kernels/cpu/sgd.py:
//   v = momentum * v + (grad + weight_decay * w);   w = w - lr * v
// One launch updates every parameter of the net: a VGG step is one kernel, not 38.
#include "common.cuh"

// The parameters are laid end to end in one virtual vector of offsets[num_params] elements:
// parameter p owns elements offsets[p] <= i < offsets[p+1] (offsets[0] = 0).
// params, grads and velocities are tables of device pointers, one entry per parameter.
// Thread index i -> (p, j): p by binary search over the offsets, j = i - offsets[p].
template <typename T>
__global__ void sgd_update(T* const* params, const T* const* grads, T* const* velocities,
                           const long long* offsets, int num_params, T lr, T momentum,
                           T weight_decay) {
    long long total = offsets[num_params];
    FOR_EACH_INDEX(i, total) {
        int lo = 0, hi = num_params - 1;  // the last p with offsets[p] <= i
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
        }
        long long j = i - offsets[lo];
        T w = params[lo][j];
        T v = momentum * velocities[lo][j] + (grads[lo][j] + weight_decay * w);
        velocities[lo][j] = v;
        params[lo][j] = w - lr * v;
    }
}
