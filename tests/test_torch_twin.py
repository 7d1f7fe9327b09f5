"""benchmarks/train_torch_twin.py builds the same net and takes the same SGD steps as minivgg.

So whatever separates the two engines' accuracy in the study is what the twin cannot share:
the random draws (initial weights, dropout masks) and float32 rounding, i.e. seed noise.
"""

from pathlib import Path

import numpy as np
import pytest

from minivgg import functional as F
from minivgg import models, optim
from minivgg.tensor import Tensor
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["A", "A-LRN", "C"])
def test_twin_steps_equal_minivgg_steps_from_the_same_weights(config, torch):
    twin = load_script("benchmarks/train_torch_twin.py")
    torch.manual_seed(0)
    net = twin.torch_vgg(torch, config, 10, 1 / 16, 32, 64, dropout=0.0).double()
    model = models.vgg(config, 10, 1 / 16, 32, 64, init="glorot", dropout=0.0,
                       dtype=np.float64, seed=0)
    params = [p for _, p in model.named_parameters()]
    assert [tuple(p.shape) for p in net.parameters()] == [p.shape for p in params]
    with torch.no_grad():  # the twin starts from minivgg's weights
        for p, q in zip(net.parameters(), params):
            p.copy_(torch.from_numpy(q.data))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sgd = optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    rate = twin.TorchRate(opt)
    schedule = optim.ReduceLROnPlateau(rate, mode="min", factor=0.1, patience=0)
    rng = np.random.default_rng(1)
    for step in range(3):
        x, y = rng.normal(0, 50, (4, 3, 64, 64)), rng.integers(0, 10, 4)
        loss = F.cross_entropy(model(Tensor(x)), y)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        t_loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)),
                                                   torch.from_numpy(y))
        opt.zero_grad()
        t_loss.backward()
        opt.step()
        assert float(loss.item()) == pytest.approx(float(t_loss.detach()), rel=1e-9)
        schedule.step(1.0)  # no improvement after the first: the rate is cut on both
        sgd.lr = rate.lr
    assert rate.lr == pytest.approx(1e-4)
    for p, q in zip(net.parameters(), params):
        np.testing.assert_allclose(p.detach().numpy(), q.data, rtol=1e-7, atol=1e-10)


def test_twin_stops_at_the_plateau_after_the_third_cut(tmp_path, torch):
    """--stop-at-plateau ends the twin where train_imagenet.py would end: lr 1e-12 leaves
    the val error where epoch 1 put it, so patience 0 cuts after epochs 2, 3, 4 and epoch
    5's plateau ends the run, well before --epochs 20."""
    from minivgg import metrics
    from test_data import make_layout
    twin = load_script("benchmarks/train_torch_twin.py")
    data = make_layout(str(tmp_path / "data"), per_class=4)
    out = tmp_path / "twin"
    assert twin.main([data, "-a", "A", "--epochs", "20", "--lr", "1e-12", "--lr-patience",
                      "0", "--stop-at-plateau", "--width", "0.0625", "--fc-width", "16",
                      "--scale", "40", "--crop", "32", "-b", "4", "-j", "0", "--threads",
                      "1", "--output", str(out)]) == 0
    rows = metrics.read_metrics(str(out / "metrics.csv"))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-12] * 2 + [1e-13, 1e-14, 1e-15])
