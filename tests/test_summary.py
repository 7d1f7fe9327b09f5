"""`python -m minivgg summary`: layer table, Table 2 totals, multiply-adds, receptive fields."""

import os
import subprocess
import sys

import pytest

from minivgg import models, nn
from minivgg.summary import layer_table, summary
from conftest import REPO

TABLE_2 = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
           "D": 138_357_544, "E": 143_667_240}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "minivgg", "summary", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def rows_by_name(config, input_size=224, **kwargs):
    model = models.VGG(config, input_size=input_size, **kwargs)
    return {r.name: r for r in layer_table(model, input_size)}, model


def test_cli_prints_every_layer_of_d_and_the_table_2_total():
    out = run_cli("D")
    assert out.returncode == 0, out.stderr
    names = [k for k, _ in models.VGG("D", width=1 / 16, fc_width=8).named_children()]
    lines = out.stdout.splitlines()
    for name in names:
        assert any(line.split()[:1] == [name] for line in lines), name
    total = [line for line in lines if line.startswith("total")]
    assert total and "138,357,544" in total[0]
    assert "512x7x7" in out.stdout  # pool5 at 224


@pytest.mark.parametrize("args, text", [(("D", "--input-size", "16"), "at least 32"),
                                        (("Q",), "unknown VGG configuration")])
def test_cli_reports_bad_arguments_on_stderr_with_exit_code_2(args, text):
    out = run_cli(*args)
    assert out.returncode == 2 and text in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("config", list(TABLE_2))
def test_summary_total_equals_table_2(config):
    lines = summary(config).splitlines()
    assert f"{TABLE_2[config]:,}" in lines[-1]


def test_total_multiply_adds_match_the_published_vgg_figures():
    """torchvision's model cards give 7.61, 11.31, 15.47 and 19.63 GMACs ("GFLOPS") for
    VGG-11/13/16/19 at 224x224; our per-layer sums must round to the same values."""
    for config, gmacs in [("A", 7.61), ("B", 11.31), ("D", 15.47), ("E", 19.63)]:
        rows, _ = rows_by_name(config)
        assert round(sum(r.macs for r in rows.values()) / 1e9, 2) == gmacs, config


@pytest.mark.parametrize("config, input_size", [("D", 224), ("C", 64), ("A-LRN", 100)])
def test_conv_multiply_adds_are_oc_c_kh_kw_oh_ow(config, input_size):
    rows, model = rows_by_name(config, input_size)
    for name, layer in model.conv_layers():
        oc, c, kh, kw = layer.weight.shape
        _, oh, ow = rows[name].out_shape
        assert rows[name].macs == oc * c * kh * kw * oh * ow, name
        assert rows[name].params == oc * c * kh * kw + oc
    assert rows["fc6"].macs == model.fc6.weight.size


def test_receptive_field_of_conv3_2_in_a_is_26():
    """By hand: conv1_1 3; pool1 4 (step 2); conv2_1 4 + 2*2 = 8; pool2 10 (step 4);
    conv3_1 10 + 2*4 = 18; conv3_2 18 + 2*4 = 26."""
    rows, _ = rows_by_name("A")
    assert [rows[n].rf for n in ("conv1_1", "pool1", "conv2_1", "pool2", "conv3_1",
                                 "conv3_2")] == [3, 4, 8, 10, 18, 26]


def test_stacked_3x3_convs_see_5x5_and_7x7_and_1x1_adds_nothing():
    """Sec. 2.3: two stacked 3x3 convs see 5x5, three see 7x7 (in units of the block's
    input grid); C's 1x1 convs leave the receptive field unchanged."""
    rows, _ = rows_by_name("D")
    assert rows["conv1_2"].rf == 5
    pool2, conv3_3 = rows["pool2"], rows["conv3_3"]
    assert (conv3_3.rf - pool2.rf) // pool2.jump + 1 == 7
    rows_c, _ = rows_by_name("C")
    for block in (3, 4, 5):
        assert rows_c[f"conv{block}_3"].rf == rows_c[f"conv{block}_2"].rf


@pytest.mark.parametrize("input_size, side", [(64, 2), (100, 3), (224, 7), (32, 1)])
def test_summary_follows_any_input_size(input_size, side):
    rows, model = rows_by_name("E", input_size, width=0.25, fc_width=64)
    assert rows["pool5"].out_shape == (128, side, side)
    assert rows["conv1_1"].out_shape == (16, input_size, input_size)
    assert rows["fc6"].params == 128 * side * side * 64 + 64
    assert sum(r.params for r in rows.values()) == model.num_parameters()
    text = summary("E", input_size, width=0.25, fc_width=64)
    assert f"input 3x{input_size}x{input_size}" in text


def test_summary_rejects_inputs_below_32():
    with pytest.raises(ValueError, match="at least 32"):
        summary("A", 31)


def test_every_layer_of_the_model_has_a_row():
    rows, model = rows_by_name("A-LRN", 64, width=1 / 16, fc_width=8)
    assert list(rows) == [k for k, _ in model.named_children()]
    assert rows["norm1"].kind == "localresponsenorm"
    assert all(isinstance(model[k], nn.Module) for k in rows)


@pytest.mark.parametrize("args, total", [
    (("A", "--input-size", "100000"), "20,480,030,102,888"),  # fc6: 4096 x 512·3125²
    (("E", "--width", "1000"), "20,119,940,562,408"),
])
def test_summary_of_a_net_too_big_to_hold_prints_without_allocating_it(args, total):
    """Tens of terabytes of weights: the table is computed from shapes alone (a memory
    limit of 1 GB on the child makes any real allocation of them fail)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "minivgg", "summary", *args], env=env,
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert out.returncode == 0, out.stderr
    assert total in out.stdout.splitlines()[-1]


def test_shapes_only_parameters_have_shapes_and_no_memory():
    with nn.shapes_only():
        layer = nn.Linear(10**6, 10**6)
    assert layer.weight.shape == (10**6, 10**6) and layer.weight.data.strides == (0, 0)
    assert nn.Linear(3, 2).weight.data.strides == (12, 4)  # outside the block: real arrays
