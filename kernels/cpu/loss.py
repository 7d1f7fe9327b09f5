"""Softmax cross-entropy on the CPU (the training objective, Sec. 3.1), the twin of
`cuda/loss.cu`. Plain NumPy: a pass over (N, classes) logits."""

import numpy as np


def softmax_cross_entropy_forward(logits, labels):
    """Mean over the batch of -log softmax(logits)[label] -> (loss, probs).

    NOTE: subtract each row's max before exp, so logits of +-1000 stay finite.
    """
    N = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_z
    loss = -log_probs[np.arange(N), labels].mean()
    return np.asarray(loss, dtype=logits.dtype), np.exp(log_probs)


def softmax_cross_entropy_backward(probs, labels, gloss):
    """d loss / d logits = (softmax - onehot) / N, times the incoming scalar gradient."""
    N = probs.shape[0]
    g = probs.copy()
    g[np.arange(N), labels] -= 1
    g *= gloss / N
    return g
