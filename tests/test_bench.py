"""The benchmark's arithmetic (no timing is asserted: speed is measured, not tested)."""

import itertools

import pytest

from tlkeras import bench


def test_figure_states_ours_baseline_and_their_ratio():
    line = bench.figure("inference_latency_batch1", "ms", 2.0, 8.0, batch=1)
    assert line["metric"] == "inference_latency_batch1" and line["unit"] == "ms"
    assert (line["ours"], line["baseline"], line["ratio"]) == (2.0, 8.0, 0.25)
    assert line["config"]["batch"] == 1 and "cores" in line["config"]["machine"]


def test_median_seconds_is_the_median_of_the_timed_calls(monkeypatch):
    ticks = itertools.count()
    durations = iter([5, 1, 3])  # seconds each timed call takes, in order
    clock = {"now": 0.0}

    def fake_perf_counter():
        next(ticks)
        return clock["now"]

    def fn():
        clock["now"] += next(durations, 0)

    monkeypatch.setattr(bench.time, "perf_counter", fake_perf_counter)
    assert bench.median_seconds(fn, repeats=3, warmup=0) == 3


def test_run_without_export_is_a_user_error(tmp_path):
    from tlkeras.config import dump_yaml, load_config

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(None)))
    (tmp_path / "summary.json").write_text('{"exports": []}')
    with pytest.raises(bench.UserError, match="has no export"):
        bench.exported_model(tmp_path, tmp_path, None)


def test_figures_that_need_a_run_without_one_are_one_line(capsys):
    assert bench.main(["--only", "adversarial", "--only", "phase1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adversarial phase1 needs --run-dir" in err[0], err


def test_conv_macs_counts_vgg16_and_the_trainable_part():
    from tlkeras.config import ModelConfig
    from tlkeras.model import build_model, set_finetune_trainable

    model = build_model(ModelConfig(weights=None, resolution=32, head_units=16), bench.cifar10_info())
    total, trainable, input_grad = bench.conv_macs(model)
    assert abs(total - 0.313e9) / 0.313e9 < 0.01  # the figure for 32x32
    assert trainable == input_grad == 0  # phase 1: nothing in the base trains

    set_finetune_trainable(model, "block5")
    _, trainable, input_grad = bench.conv_macs(model)
    block5 = 3 * 2 * 2 * 3 * 3 * 512 * 512  # three 3x3 512->512 convolutions on 2x2
    assert trainable == block5 and input_grad == block5 * 2 // 3  # block5_conv1 needs no input gradient

    big = build_model(ModelConfig(weights=None, resolution=64, head_units=16), bench.cifar10_info())
    assert bench.conv_macs(big)[0] == 4 * total  # the square of the side


def test_conv_macs_counts_mobilenet_v2_depthwise_and_pointwise():
    from tlkeras.config import ModelConfig
    from tlkeras.data import DatasetInfo
    from tlkeras.model import build_model, set_finetune_trainable

    info = DatasetInfo(name="x", source="tfds", storage_size=224, class_names=("a", "b"))
    model = build_model(ModelConfig(backbone="mobilenet_v2", weights=None, head_units=8), info)
    total = bench.conv_macs(model)[0]
    assert abs(total - 300e6) / 300e6 < 0.01  # Sandler et al. 2018, Table 3: 300 M at 224
    depthwise = bench.conv_macs(model, depthwise_only=True)[0]
    # 17 depthwise 3x3 layers; the first (112x112x32) alone: 112*112*9*32 MACs
    assert 112 * 112 * 9 * 32 < depthwise < 0.1 * total

    set_finetune_trainable(model, "Conv_1")  # the last 1x1 convolution: 7x7x320 -> 1280
    _, trainable, input_grad = bench.conv_macs(model)
    assert trainable == 7 * 7 * 320 * 1280 and input_grad == 0  # nothing trainable below it


def test_runs_of_other_data_are_refused_with_a_reason(tmp_path):
    from tlkeras.config import dump_yaml, load_config

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(None, ["data.dataset=./photos"])))
    with pytest.raises(bench.UserError, match="measures CIFAR-10 runs"):
        bench.run_config(tmp_path)
    mobile = load_config(None, ["model.backbone=mobilenet_v2"])
    (tmp_path / "config.yaml").write_text(dump_yaml(mobile))
    assert bench.run_config(tmp_path) == mobile
