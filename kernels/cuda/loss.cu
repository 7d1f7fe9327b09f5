// Softmax cross-entropy, the training objective (Sec. 3.1). Twins of kernels/cpu/loss.py's
// softmax_cross_entropy_forward / _backward. logits and probs are (N, K); labels (N,) int64.
#include "common.cuh"

// Thread index i -> n, one row of the logits. Each thread runs the row's max, log-sum-exp
// and probabilities as a short serial loop over K classes: N is at most a few hundred and
// K = 1000, so this kernel is tiny next to the fc layers' GEMMs.
// NOTE: the row's max is subtracted before exp, so logits of +-1000 stay finite.
// losses[n] = -log softmax(logits[n])[labels[n]]; kernels/cuda.py takes the batch mean.
template <typename T>
__global__ void softmax_cross_entropy_forward(const T* logits, const long long* labels,
                                              T* probs, T* losses, int N, int K) {
    FOR_EACH_INDEX(n, N) {
        const T* row = logits + n * K;
        T m = row[0];
        for (int j = 1; j < K; ++j) m = max(m, row[j]);
        T z = 0;
        for (int j = 0; j < K; ++j) z += exp(row[j] - m);
        T log_z = log(z);
        for (int j = 0; j < K; ++j) probs[n * K + j] = exp(row[j] - m - log_z);
        losses[n] = -(row[labels[n]] - m - log_z);
    }
}

// Thread index i -> (n, j), one logit: i = n*K + j.
// d loss / d logits = (softmax - onehot(label)) / N, times the incoming gradient gloss[0]
// (a one-element device array, so reading it needs no host synchronisation).
template <typename T>
__global__ void softmax_cross_entropy_backward(const T* probs, const long long* labels,
                                               const T* gloss, T* glogits, int N, int K) {
    FOR_EACH_INDEX(i, (long long)N * K) {
        long long n = i / K;
        int j = i % K;
        T onehot = j == labels[n] ? T(1) : T(0);
        glogits[i] = (probs[i] - onehot) * (gloss[0] / T(N));
    }
}
