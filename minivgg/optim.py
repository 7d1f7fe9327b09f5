"""Mini-batch SGD with momentum and weight decay, and the plateau schedule (Sec. 3.1)."""

import math

from minivgg import backend


class SGD:
    """Momentum SGD with L2 weight decay; the paper uses lr 1e-2, momentum 0.9, wd 5e-4.

    Momentum convention (PyTorch's, so steps equal `torch.optim.SGD`'s):

        g = grad + weight_decay * w
        v = momentum * v + g
        w = w - lr * v

    NOTE: Caffe, which the paper used, folds the rate into the velocity instead,
    v = momentum * v + lr * g; w -= v. The two agree while lr is constant and differ for a
    few steps after each decrease; with PyTorch's a decrease takes effect at once.
    """

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=5e-4):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("SGD: got an empty parameter list")
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: need lr > 0, momentum >= 0, weight_decay >= 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocities = [None] * len(self.params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        """One update of every parameter that has a gradient, in place."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in active:
            if self.velocities[i] is None or self.velocities[i].shape != self.params[i].shape:
                self.velocities[i] = backend.array_module(self.params[i].data).zeros_like(
                    self.params[i].data)
            elif backend.device_of(self.velocities[i]) != self.params[i].device:
                self.velocities[i] = backend.to_device(self.velocities[i],
                                                       self.params[i].device)
        if not active:
            return
        kern = backend.kernels_for(self.params[active[0]].data)
        kern.sgd_update([self.params[i].data for i in active],
                        [self.params[i].grad for i in active],
                        [self.velocities[i] for i in active],
                        self.lr, self.momentum, self.weight_decay)

    def state_dict(self):
        """Hyper-parameters and momentum buffers (host arrays; None where no step yet)."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "velocities": [None if v is None else backend.to_numpy(v).copy()
                               for v in self.velocities]}

    def load_state_dict(self, state):
        velocities = state["velocities"]
        if len(velocities) != len(self.params):
            raise ValueError(f"SGD.load_state_dict: state has {len(velocities)} momentum "
                             f"buffers, the optimizer has {len(self.params)} parameters")
        for i, (v, p) in enumerate(zip(velocities, self.params)):
            if v is not None and tuple(v.shape) != p.shape:
                raise ValueError(f"SGD.load_state_dict: buffer {i} has shape {tuple(v.shape)},"
                                 f" parameter has {p.shape}")
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        self.velocities = [None if v is None else backend.to_device(v.astype(p.dtype),
                                                                    p.device)
                           for v, p in zip(velocities, self.params)]


class ReduceLROnPlateau:
    """Divide the rate by 10 when the validation metric stops improving (Sec. 3.1).

    `mode="max"` for accuracy, "min" for error or loss. After `patience` epochs without an
    improvement larger than `threshold` the rate is multiplied by `factor`; after
    `max_decreases` decreases (3 in the paper) it is left alone, and `ended` turns True at
    the next plateau: the paper stopped training after its third decrease (Sec. 3.1).
    """

    def __init__(self, optimizer, mode="max", factor=0.1, patience=0, threshold=1e-4,
                 max_decreases=3):
        if mode not in ("max", "min"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'max' or 'min', got {mode!r}")
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        self.optimizer, self.mode, self.factor = optimizer, mode, factor
        self.patience, self.threshold, self.max_decreases = patience, threshold, max_decreases
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0
        self.decreases = 0

    def _improved(self, metric):
        if self.mode == "max":
            return metric > self.best + self.threshold
        return metric < self.best - self.threshold

    def step(self, metric):
        """Record one epoch's validation metric; returns True when the rate was cut."""
        metric = float(metric)
        if self._improved(metric):
            self.best, self.bad_epochs = metric, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience and self.decreases < self.max_decreases:
            self.optimizer.lr *= self.factor
            self.decreases += 1
            self.bad_epochs = 0
            return True
        return False

    @property
    def ended(self):
        """True once the metric has plateaued again after the last allowed decrease."""
        return self.decreases >= self.max_decreases and self.bad_epochs > self.patience

    def state_dict(self):
        return {"mode": self.mode, "factor": self.factor, "patience": self.patience,
                "threshold": self.threshold, "max_decreases": self.max_decreases,
                "best": self.best, "bad_epochs": self.bad_epochs, "decreases": self.decreases}

    def load_state_dict(self, state):
        for key in ("mode", "factor", "patience", "threshold", "max_decreases", "best",
                    "bad_epochs", "decreases"):
            setattr(self, key, state[key])
