"""The trust report: calibration maths, the calibrated export, the command on a tiny run."""

import json

import keras
import numpy as np
import pytest
from conftest import tiny_info, tiny_overrides

from tlkeras import evaluate as E
from tlkeras.config import ModelConfig, load_config
from tlkeras.model import build_model
from tlkeras.robustness import CORRUPTIONS, EPSILONS
from tlkeras.training import train_and_evaluate


def test_ece_of_hand_made_probabilities():
    # Three right at confidence 0.55 (bin (8/15, 9/15]: |1 - 0.55| = 0.45) and one wrong at
    # 0.95 (bin (14/15, 1]: |0 - 0.95|): ECE = 3/4 * 0.45 + 1/4 * 0.95 = 0.575.
    probs = np.array([[0.55, 0.45]] * 3 + [[0.95, 0.05]])
    labels = np.array([0, 0, 0, 1])
    assert E.expected_calibration_error(probs, labels) == pytest.approx(0.575)
    # Eight of ten right at confidence 0.8: perfectly calibrated.
    assert E.expected_calibration_error(np.array([[0.8, 0.2]] * 10), np.array([0] * 8 + [1] * 2)) == pytest.approx(0)
    # One bin: ECE is |accuracy - mean confidence|.
    assert E.expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - (3 * 0.55 + 0.95) / 4))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (20000, 10))
    truth = 2.5  # labels drawn from softmax(logits / 2.5): the model is overconfident
    p = E.softmax(logits, truth)
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)
    t = E.fit_temperature(logits, labels)
    assert t == pytest.approx(truth, rel=0.05)
    assert E.negative_log_likelihood(logits, labels, t) < E.negative_log_likelihood(logits, labels)
    before = E.expected_calibration_error(E.softmax(logits), labels)
    after = E.expected_calibration_error(E.softmax(logits, t), labels)
    assert before > 0.1 and after < 0.02, (before, after)


def test_a_temperature_is_shipped_only_when_it_helps_held_out_val_images():
    def val(truth, seed, n=200):  # labels drawn from softmax(logits / truth)
        rng = np.random.default_rng(seed)
        logits = rng.normal(0, 3, (n, 10))
        return logits, (E.softmax(logits, truth).cumsum(1) > rng.random((n, 1))).argmax(1)

    overconfident = [E.choose_temperature(*val(2.0, s)) for s in range(30)]
    assert all(ev["kept"] and t == pytest.approx(ev["fitted"], abs=1e-4) and 1.5 < t < 2.7 for t, ev in overconfident)
    calibrated = [E.choose_temperature(*val(1.0, s)) for s in range(30)]
    # Nothing to fix: a fitted T (noise around 1) is mostly refused, and then T is exactly 1.
    assert sum(ev["kept"] for _, ev in calibrated) < 18
    assert all(t == 1.0 for t, ev in calibrated if not ev["kept"])
    t, ev = E.choose_temperature(*val(2.0, 0, n=12))  # too few to split: no evidence, T = 1
    assert t == 1.0 and not ev["kept"]
    # Every val image right (a small photo folder): the NLL falls towards T -> 0, a bound of
    # the search, not a fit; shipping it would turn every answer, wrong ones too, into 0 or 1.
    logits = np.random.default_rng(0).normal(0, 1, (60, 2))
    logits[:, 0] += 3.0
    t, ev = E.choose_temperature(logits, np.zeros(60, int))
    assert ev["fitted"] < 0.1 and t == 1.0 and not ev["kept"] and "no minimum" in ev["reason"]


def test_the_calibrated_export_passes_parity_and_outputs_softmax_of_logits_over_t(tmp_path):
    from tlkeras.export import TOLERANCE, export_model, run_onnx, run_tf1_session

    info = tiny_info()
    keras.utils.set_random_seed(0)  # random weights, but the same in every run of the test
    model = build_model(ModelConfig(weights=None, resolution=32, head_units=16), info)
    head = model.layers[-1]
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    spread = E.predict_logits(E.logits_function(model), images).std(axis=1).mean()
    head.kernel.assign(head.kernel * (3.0 / spread))  # logits ~3 apart: T visibly changes the probabilities
    head.bias.assign(head.bias * 0)
    logits = E.predict_logits(E.logits_function(model), images)
    record = export_model(model, tmp_path, "tlkeras", images, info.class_names, temperature=2.0)
    assert record["temperature"] == 2.0 and record["parity"]["onnx"]["max_abs_diff"] <= 1e-4
    expected = E.softmax(logits, 2.0)
    assert np.abs(expected - E.softmax(logits)).max() > 0.05  # calibration is not a no-op here
    for out in (run_onnx(record["onnx"], images), run_tf1_session(record["savedmodel"], images)):
        np.testing.assert_allclose(out["probabilities"], expected, atol=TOLERANCE)  # the gate's 1e-4
        np.testing.assert_array_equal(out["classes"], logits.argmax(1))  # same classes as uncalibrated
    np.testing.assert_allclose(model.predict(images, verbose=0), E.softmax(logits), atol=TOLERANCE)  # untouched


def test_cli_bad_run_folders_are_one_line_and_exit_1(tmp_path, capsys):
    assert E.main(["--run-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "missing" in err[0]

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    assert E.main(["--run-dir", str(unfinished)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has not finished" in err[0], err


def test_a_run_reports_at_the_end_of_training_and_on_demand(mock_cifar, tmp_path, capsys, monkeypatch):
    # 24 mock val images: too few for the held-out check to keep a fitted T (its own test is
    # above); keep the fitted T here so that the plumbing of a T != 1 into the exports is tested.
    fitted = lambda logits, labels, seed=0: (E.fit_temperature(logits, labels), {"kept": True})  # noqa: E731
    monkeypatch.setattr(E, "choose_temperature", fitted)
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "data.val_split": "train",
                "finetune.epochs": "0",
                "export.enabled": "true",
                "evaluate.enabled": "true",
                "evaluate.quick_adversarial_images": "8",
                "evaluate.quick_test_images": "10",
            }
        ),
    )
    summary = train_and_evaluate(cfg, tmp_path)
    t = summary["temperature"]
    assert t > 0 and t != 1.0 and summary["exports_calibrated"] and summary["exports"][0]["temperature"] == t
    assert summary["trust_report"]["file"] == "report.json"
    first = json.loads((tmp_path / "report.json").read_text())
    assert first["quick"] and first["calibration"]["temperature"] == t
    # It reuses training's test pass: clean accuracy and calibration on the whole test split.
    assert first["clean"]["images"] == summary["test_examples"] == 24 and first["tta"]["images"] == 10
    assert first["clean"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)

    assert E.main(["--run-dir", str(tmp_path)]) == 0  # the full report, from the folder alone
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["quick"] and report["clean"]["images"] == 24
    assert report["clean"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert report["calibration"]["temperature"] == pytest.approx(t, rel=1e-3)  # deterministic
    assert report["calibration"]["bins"] == 15 and report["tta"]["images"] == 24
    assert list(report["corruptions"]["accuracy"]) == list(CORRUPTIONS)
    assert all(len(row) == 5 for row in report["corruptions"]["accuracy"].values())
    assert "generated" in report["corruptions"]["source"]
    assert list(report["adversarial"]["pgd"]) == [str(e) for e in EPSILONS]
    for name in (E.RELIABILITY_PNG, E.GALLERY_PNG):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    assert "report.json" in capsys.readouterr().out

    from tlkeras.export import export_run  # a later export folds the run's temperature too

    assert export_run(tmp_path, parity_count=8)["temperature"] == t


def test_the_published_cifar10_corrupted_is_read_when_it_is_in_data_dir(tmp_path):
    import dataclasses

    import tensorflow as tf
    import tensorflow_datasets as tfds

    (tmp_path / "cifar10_corrupted").mkdir()  # tfds's mock data stands in for its files
    cfg = load_config(None, [f"data.data_dir={tmp_path}"])
    info = dataclasses.replace(tiny_info(), splits={"test": "test"})
    seen = []

    def logits_fn(images):  # records what was classified; always answers class 0
        seen.append(np.asarray(images))
        return tf.constant(np.tile(np.eye(10)[0], (len(images), 1)))

    blank = np.zeros((8, 32, 32, 3), np.uint8)
    with tfds.testing.mock_data(num_examples=8):
        report = E.corruption_accuracy(logits_fn, blank, np.zeros(8, np.int64), cfg, info, seed=0)
    assert report["source"].startswith("tfds cifar10_corrupted")
    assert len(seen) == 5 * len(CORRUPTIONS) and all(x.shape == (8, 32, 32, 3) and x.any() for x in seen)
    generated = E.corruption_accuracy(
        logits_fn, blank, np.zeros(8, np.int64), cfg, dataclasses.replace(info, storage_size=64), seed=0
    )
    assert generated["source"].startswith("generated") and generated["mean_accuracy"] == 1.0


def test_balanced_accuracy_exposes_a_dead_minority_class():
    # 500 of class 0 all right, 5 of class 1 all called class 0: accuracy 0.99, balanced 0.5.
    labels = np.array([0] * 500 + [1] * 5)
    preds = np.zeros_like(labels)
    recalls = E.per_class_recall(preds, labels, 3)  # class 2 has no test image
    assert recalls == [1.0, 0.0, None]
    assert (preds == labels).mean() == pytest.approx(0.990, abs=1e-3)
    assert E.balanced_accuracy(recalls) == 0.5
    assert E.balanced_accuracy([None, None]) == 0.0

    names = ("ants", "bees", "wasps")
    dead, imbalance = E.headline_warnings(names, recalls, [500, 5, 50])
    assert dead.startswith("class 'bees': none of its test images is predicted right (recall 0)")
    assert dead.endswith("data.class_weight=true weighs the classes equally")
    assert "'ants' 500 images against 'bees' 5 (ratio 100)" in imbalance and "data.class_weight=true" in imbalance
    on = E.headline_warnings(names, recalls, [500, 5, 50], class_weight=True)
    assert len(on) == 2 and "weighs" not in on[0] and "(data.class_weight=true is on)" in on[1]
    # Balanced train classes (ratio 9 < 10): a dead class is named, class weights are not.
    (dead,) = E.headline_warnings(names, recalls, [90, 10, 50])
    assert "'bees'" in dead and "class_weight" not in dead
    assert E.headline_warnings(names, [0.9, 0.5, None], [90, 10, 50]) == []


def test_the_quick_report_skips_fixed_cost_passes_on_a_small_run_only():
    assert "221 train images < 1000" in E.quick_skip_reason(221, 153)
    assert "150 test images < 200" in E.quick_skip_reason(5000, 150)
    assert E.quick_skip_reason(5000, 10000) is None
