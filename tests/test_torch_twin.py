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


# --- checkpoint and resume --------------------------------------------------------------

def tiny_run(data, out, epochs, *extra):
    return [data, "-a", "A", "--epochs", str(epochs), "--width", "0.0625", "--fc-width",
            "16", "--scale", "40", "--crop", "32", "-b", "4", "-j", "0", "--threads", "1",
            "--lr-patience", "0", "--output", str(out), *extra]


def learned(rows):
    """A metrics.csv's rows without the timing columns (which no two runs share)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in rows]


def test_twin_stopped_and_resumed_ends_as_the_run_without_the_stop(tmp_path, torch):
    """Weights, momentum, schedule, dropout's random state and the rows come back from
    last.pt: 1 epoch + a resume to 3 is the 3-epoch run, bit for bit. The val images are
    all one grey, so the val error is 50% at every epoch and patience 0 cuts the rate
    after epoch 2 whatever the (per-process random) training images teach."""
    from minivgg import metrics
    from test_data import make_layout, write_image
    twin = load_script("benchmarks/train_torch_twin.py")
    data = make_layout(str(tmp_path / "data"), per_class=4, splits=("train",))
    for c in ("n01", "n02"):
        for i in range(4):
            write_image(str(tmp_path / "data" / "val" / c / f"{c}_{i}.JPEG"), "RGB",
                        colour=(128, 128, 128))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert twin.main(tiny_run(data, whole, 3)) == 0
    assert twin.main(tiny_run(data, parts, 1)) == 0
    assert len(metrics.read_metrics(str(parts / "metrics.csv"))) == 1
    assert twin.main(tiny_run(data, parts, 3, "--resume", str(parts / "last.pt"))) == 0
    rows = [metrics.read_metrics(str(out / "metrics.csv")) for out in (whole, parts)]
    assert len(rows[0]) == 3 and learned(rows[0]) == learned(rows[1])
    assert [r["lr"] for r in rows[0]] == ["0.01", "0.01", "0.001"]  # cut after epoch 2
    states = [torch.load(str(out / "last.pt"), weights_only=True) for out in (whole, parts)]
    for key, value in states[0]["net"].items():
        assert torch.equal(value, states[1]["net"][key]), key
    assert states[0]["schedule"] == states[1]["schedule"]


def test_twin_never_starts_over_in_a_folder_that_holds_a_run(tmp_path, torch, capsys):
    from test_data import make_layout
    twin = load_script("benchmarks/train_torch_twin.py")
    data = make_layout(str(tmp_path / "data"), per_class=4)
    out = tmp_path / "twin"
    assert twin.main(tiny_run(data, out, 1)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert twin.main(tiny_run(data, out, 2)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and f"--resume {out / 'last.pt'}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    other = tmp_path / "other"  # resuming from another folder into this one: refused too
    assert twin.main(tiny_run(data, other, 1)) == 0
    assert twin.main(tiny_run(data, out, 2, "--resume", str(other / "last.pt"))) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("problem", ["missing", "damaged", "recipe"])
def test_twin_resume_errors_name_the_problem(tmp_path, torch, capsys, problem):
    from test_data import make_layout
    twin = load_script("benchmarks/train_torch_twin.py")
    data = make_layout(str(tmp_path / "data"), per_class=4)
    out = tmp_path / "twin"
    assert twin.main(tiny_run(data, out, 1)) == 0
    last = out / "last.pt"
    argv = tiny_run(data, out, 2, "--resume", str(last))
    if problem == "missing":
        argv = tiny_run(data, tmp_path / "new", 2, "--resume", str(tmp_path / "nope.pt"))
        expected = "no such file"
    elif problem == "damaged":
        last.write_bytes(last.read_bytes()[:1000])
        expected = "not a readable twin checkpoint"
    else:
        argv += ["--seed", "3"]
        expected = "another recipe (--seed 0 -> 3)"
    capsys.readouterr()
    assert twin.main(argv) == 2
    assert expected in capsys.readouterr().err
