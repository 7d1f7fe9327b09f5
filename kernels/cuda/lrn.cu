// Local response normalisation across channels (AlexNet Sec. 3.3; VGG's A-LRN, Sec. 2.1):
//   scale_c = k + alpha * sum_{c' in window(c)} x_c'^2,   y_c = x_c * scale_c^-beta,
// window(c) = c - size/2 ... c + (size-1)/2, clipped to [0, C), as in kernels/cpu/lrn.py.
// `alpha` multiplies the plain sum; functional.local_response_norm has divided it by
// `size` already when the Caffe/PyTorch convention was asked for.
#include "common.cuh"

// Thread index i -> (n, c, iy, ix), one element: i = ((n*C + c)*H + iy)*W + ix.
// The thread walks its own channel window; neighbours in ix read neighbouring addresses.
template <typename T>
__global__ void lrn_forward(const T* x, T* y, T* scale, int N, int C, int H, int W,
                            int size, T alpha, T beta, T k) {
    long long HW = (long long)H * W;
    FOR_EACH_INDEX(i, N * C * HW) {
        int c = (i / HW) % C;
        long long first = i - c * HW;  // element (n, 0, iy, ix)
        int lo = max(0, c - size / 2), hi = min(C - 1, c + (size - 1) / 2);
        T sum = 0;
        for (int cc = lo; cc <= hi; ++cc) {
            T a = x[first + cc * HW];
            sum += a * a;
        }
        T s = k + alpha * sum;
        scale[i] = s;
        y[i] = x[i] * pow(s, -beta);
    }
}

// Thread index i -> (n, c, iy, ix), as in lrn_forward.
//   gx_c = gy_c scale_c^-beta - 2 alpha beta x_c sum_{c': c in window(c')} gy_c' y_c' / scale_c'
// c lies in window(c') exactly when c' = c - (size-1)/2 ... c + size/2: the window mirrored.
template <typename T>
__global__ void lrn_backward(const T* x, const T* y, const T* scale, const T* gy, T* gx,
                             int N, int C, int H, int W, int size, T alpha, T beta) {
    long long HW = (long long)H * W;
    FOR_EACH_INDEX(i, N * C * HW) {
        int c = (i / HW) % C;
        long long first = i - c * HW;
        int lo = max(0, c - (size - 1) / 2), hi = min(C - 1, c + size / 2);
        T back = 0;
        for (int cc = lo; cc <= hi; ++cc) {
            long long j = first + cc * HW;
            back += gy[j] * y[j] / scale[j];
        }
        gx[i] = gy[i] * pow(scale[i], -beta) - T(2) * alpha * beta * x[i] * back;
    }
}
