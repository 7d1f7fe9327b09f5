"""SGD with momentum and weight decay, and the plateau schedule (Sec. 3.1)."""

import math

import numpy as np
import pytest

from minivgg import optim
from minivgg.nn import Parameter
from conftest import assert_close, to_device, to_numpy

SHAPES = [(4, 3), (5,), (2, 2, 3)]


def make_pair(torch, device, dtype, seed=0):
    """The same parameters in minivgg (on `device`) and in torch (CPU)."""
    rng = np.random.default_rng(seed)
    values = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    ours = [Parameter(to_device(v.copy(), device)) for v in values]
    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in values]
    return ours, theirs


def set_grads(ours, theirs, rng, skip=()):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad, t.grad = None, None
            continue
        g = rng.normal(size=p.shape).astype(p.dtype)
        p.grad = to_device(g, p.device)
        t.grad = __import__("torch").from_numpy(g.copy())


def assert_params_equal(ours, theirs, dtype, step):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        assert_close(p, t.detach().numpy(), "sgd", dtype, f"param {i} after step {step}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sgd_steps_equal_torch_sgd_with_momentum_and_weight_decay(dtype, device, torch):
    ours, theirs = make_pair(torch, device, dtype)
    opt = optim.SGD(ours, lr=0.01, momentum=0.9, weight_decay=5e-4)
    topt = torch.optim.SGD(theirs, lr=0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(1)
    for step in range(6):
        # step 2: parameter 1 has no gradient (both skip it, momentum buffer untouched);
        # step 4: parameter 0 has none.
        skip = {2: (1,), 4: (0,)}.get(step, ())
        set_grads(ours, theirs, rng, skip)
        opt.step()
        topt.step()
        assert_params_equal(ours, theirs, dtype, step)
        assert all(p.dtype == np.dtype(dtype) for p in ours)


def test_sgd_first_step_skips_parameters_without_gradient(device, torch):
    ours, theirs = make_pair(torch, device, np.float64)
    opt = optim.SGD(ours, lr=0.1)
    before = to_numpy(ours[2]).copy()
    set_grads(ours, theirs, np.random.default_rng(0), skip=(2,))
    opt.step()
    np.testing.assert_array_equal(to_numpy(ours[2]), before)
    assert opt.velocities[2] is None


def test_sgd_learning_rate_change_takes_effect_at_once_like_torch(device, torch):
    ours, theirs = make_pair(torch, device, np.float64)
    opt = optim.SGD(ours, lr=0.01, momentum=0.9, weight_decay=5e-4)
    topt = torch.optim.SGD(theirs, lr=0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(2)
    for step in range(5):
        if step == 3:  # a plateau cut: divide by 10
            opt.lr /= 10
            for group in topt.param_groups:
                group["lr"] /= 10
        set_grads(ours, theirs, rng)
        opt.step()
        topt.step()
        assert_params_equal(ours, theirs, np.float64, step)


def test_sgd_without_momentum_or_decay_is_plain_gradient_descent(device):
    p = Parameter(to_device(np.array([1.0, -2.0]), device))
    opt = optim.SGD([p], lr=0.5, momentum=0.0, weight_decay=0.0)
    p.grad = to_device(np.array([0.2, 0.4]), device)
    opt.step()
    opt.step()
    np.testing.assert_allclose(to_numpy(p), [1.0 - 0.2, -2.0 - 0.4], rtol=1e-15)


def test_sgd_zero_grad_clears_gradients(device):
    p = Parameter(to_device(np.ones(2), device))
    p.grad = to_device(np.ones(2), device)
    opt = optim.SGD([p])
    opt.zero_grad()
    assert p.grad is None


def test_sgd_state_dict_round_trip_continues_identically(device, torch):
    ours, theirs = make_pair(torch, device, np.float64)
    opt = optim.SGD(ours, lr=0.02, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(3)
    set_grads(ours, theirs, rng, skip=(2,))
    opt.step()
    state = opt.state_dict()
    assert state["velocities"][2] is None and isinstance(state["velocities"][0], np.ndarray)

    clones = [Parameter(to_device(to_numpy(p).copy(), device)) for p in ours]
    opt2 = optim.SGD(clones, lr=1.0, momentum=0.0, weight_decay=0.0)
    opt2.load_state_dict(state)
    assert (opt2.lr, opt2.momentum, opt2.weight_decay) == (0.02, 0.9, 5e-4)
    grads = [rng.normal(size=s) for s in SHAPES]
    for params, o in ((ours, opt), (clones, opt2)):
        for p, g in zip(params, grads):
            p.grad = to_device(g, device)
        o.step()
    for a, b in zip(ours, clones):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_sgd_load_state_dict_rejects_mismatched_buffers():
    opt = optim.SGD([Parameter(np.ones((2, 3)))])
    with pytest.raises(ValueError, match="2 momentum buffers.*1 parameters"):
        opt.load_state_dict({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                             "velocities": [None, None]})
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        opt.load_state_dict({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                             "velocities": [np.zeros((3, 2))]})


@pytest.mark.parametrize("kwargs, what", [(dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"),
                                          (dict(momentum=-0.1), "momentum"),
                                          (dict(weight_decay=-1e-4), "weight_decay")])
def test_sgd_rejects_bad_hyper_parameters(kwargs, what):
    with pytest.raises(ValueError, match=what):
        optim.SGD([Parameter(np.ones(2))], **kwargs)


def test_sgd_rejects_an_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([])


def test_sgd_docstring_states_the_momentum_convention():
    doc = optim.SGD.__doc__
    assert "v = momentum * v + g" in doc and "w = w - lr * v" in doc


# ----------------------------------------------------------------------------------------
# ReduceLROnPlateau
# ----------------------------------------------------------------------------------------

def plateau(patience=0, max_decreases=3, mode="max", lr=0.01):
    opt = optim.SGD([Parameter(np.ones(1))], lr=lr)
    return opt, optim.ReduceLROnPlateau(opt, mode=mode, patience=patience,
                                        max_decreases=max_decreases)


def test_plateau_divides_rate_by_10_when_accuracy_stops_improving():
    opt, sched = plateau(patience=0)
    assert sched.step(0.50) is False
    assert sched.step(0.60) is False
    assert opt.lr == 0.01
    assert sched.step(0.60) is True  # no improvement
    assert math.isclose(opt.lr, 0.001)
    assert sched.step(0.55) is True  # worse again: a second cut
    assert math.isclose(opt.lr, 1e-4)


def test_plateau_waits_for_patience_epochs_and_an_improvement_resets_the_count():
    opt, sched = plateau(patience=2)
    sched.step(0.5)
    assert [sched.step(0.4), sched.step(0.45)] == [False, False]
    assert sched.step(0.7) is False  # improvement: counter back to 0
    assert [sched.step(0.6), sched.step(0.6), sched.step(0.6)] == [False, False, True]
    assert math.isclose(opt.lr, 0.001)


def test_plateau_stops_after_max_decreases():
    opt, sched = plateau(patience=0, max_decreases=3)
    sched.step(1.0)
    cuts = [sched.step(0.0) for _ in range(6)]
    assert cuts == [True, True, True, False, False, False]
    assert sched.decreases == 3
    assert math.isclose(opt.lr, 0.01 / 1000)


def test_plateau_has_ended_at_the_plateau_after_the_last_decrease():
    opt, sched = plateau(patience=1, max_decreases=2, mode="min")
    steps = [0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3]  # cuts after the 3rd and 6th
    ended = []
    for m in steps:
        sched.step(m)
        ended.append(sched.ended)
    assert sched.decreases == 2 and ended == [False] * 8 + [True]
    sched.step(0.1)  # an improvement after the end: the schedule is live again, no cut
    assert not sched.ended and sched.decreases == 2 and math.isclose(opt.lr, 1e-4)


def test_plateau_in_min_mode_watches_a_falling_metric():
    opt, sched = plateau(mode="min")
    sched.step(2.0)
    assert sched.step(1.5) is False
    assert sched.step(1.6) is True
    assert math.isclose(opt.lr, 0.001)


def test_plateau_state_dict_round_trip():
    opt, sched = plateau(patience=1)
    for m in (0.3, 0.5, 0.4, 0.4, 0.2):
        sched.step(m)
    opt2, sched2 = plateau(patience=7, max_decreases=1)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    opt2.lr = opt.lr
    for m in (0.1, 0.1, 0.9, 0.1):
        assert sched2.step(m) == sched.step(m)
    assert opt2.lr == opt.lr


def test_plateau_rejects_bad_mode_and_factor():
    opt = optim.SGD([Parameter(np.ones(1))])
    with pytest.raises(ValueError, match="mode"):
        optim.ReduceLROnPlateau(opt, mode="up")
    with pytest.raises(ValueError, match="factor"):
        optim.ReduceLROnPlateau(opt, factor=10)


def test_sgd_kernel_updates_all_parameters_in_one_call_with_each_ones_bits(monkeypatch):
    """The CPU kernel cuts one range of all the parameters' elements per thread; each
    parameter (mixed dtypes, sizes on both sides of a range boundary, one empty) gets
    the bits of an update of its own."""
    from minivgg.kernels import cpu
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    rng = np.random.default_rng(15)
    shapes = [(70_001,), (3, 5), (0,), (40_000, 3), (7,), (2, 3, 3, 3)]
    dtypes = [np.float32, np.float64, np.float32, np.float32, np.float64, np.float32]
    ws, gs, vs = ([rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
                  for _ in range(3))
    want = [(w.copy(), v.copy()) for w, v in zip(ws, vs)]
    for (w, v), g in zip(want, gs):
        cpu.sgd_update([w], [g], [v], 0.01, 0.9, 5e-4)
    cpu.sgd_update(ws, gs, vs, 0.01, 0.9, 5e-4)
    for w, v, (w2, v2) in zip(ws, vs, want):
        for a, b in ((w, w2), (v, v2)):
            np.testing.assert_array_equal(a.view(f"i{a.itemsize}"), b.view(f"i{b.itemsize}"))
