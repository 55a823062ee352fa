"""The auto recipe: the survey of a folder, explicit settings winning, recipe.yaml round
trips as a config, and a time budget that stops training and still ships."""

from __future__ import annotations

import pytest
from conftest import make_image_folder, tiny_overrides

from tlkeras import recipe as recipe_module
from tlkeras import rundir
from tlkeras.config import load_config, to_flat_dict
from tlkeras.recipe import Recipe, Survey, survey


def test_survey_counts_the_folder_and_reads_image_headers(tmp_path):
    root = make_image_folder(tmp_path / "photos", {"ants": 20, "bees": 10}, size=(50, 36))
    data = survey(load_config(None, [f"data.dataset={root}"]).data)
    # 30 photos, 10% carved for val and 10% for test
    assert (data.num_train, data.num_val, data.num_test, data.short_side) == (24, 3, 3, 36)


def test_survey_of_split_folders_counts_them(tmp_path):
    root = make_image_folder(tmp_path / "p", {"train/a": 20, "train/b": 20, "val/a": 5, "val/b": 5}, size=(300, 200))
    data = survey(load_config(None, [f"data.dataset={root}"]).data)
    # val/ is the test split; val is carved from train/ (10%)
    assert (data.num_train, data.num_val, data.num_test, data.short_side) == (36, 4, 10, 200)


PHOTOS = Survey(num_train=3000, num_val=300, num_test=300, short_side=375)


def test_auto_settings_are_chosen_with_reasons_and_explicit_ones_win(tmp_path):
    cfg = load_config(None, ["data.dataset=./photos", "head.epochs=7", "finetune.unfreeze=block4"])
    recipe = Recipe(cfg, replicas=1, accelerator=False)
    chosen = recipe.before_data(PHOTOS)
    assert (chosen.data.batch_size, chosen.model.resolution, chosen.head.epochs) == (64, 160, 7)
    assert chosen.finetune.epochs == 10  # BiT's 256,000 images seen / 8 on a CPU, over 3,000: 10.7, capped
    assert chosen.finetune.learning_rate == "auto"  # decided after phase 1
    chosen = recipe.after_head(0.6)
    assert (chosen.finetune.unfreeze, chosen.finetune.learning_rate) == ("block4", 1e-4)
    assert recipe.reasons["head.epochs"] == recipe.reasons["finetune.unfreeze"] == "set in the config"
    assert "BiT" in recipe.reasons["finetune.epochs"] and "probe 0.600" in recipe.reasons["finetune.learning_rate"]
    assert "finetune.learning_rate = 0.0001" in recipe.table()


def test_recipe_yaml_round_trips_as_a_config(tmp_path):
    cfg = load_config(None, ["data.dataset=./photos"])
    recipe = Recipe(cfg, replicas=2, accelerator=True)
    recipe.before_data(PHOTOS)
    chosen = recipe.after_head(0.95)
    recipe.write(tmp_path)
    loaded = load_config(tmp_path / "recipe.yaml")
    assert loaded == chosen == rundir.load_run_config(tmp_path)
    # data.cache stays auto: it follows the memory of the machine that reads the data
    assert "auto" not in {
        v for k, v in to_flat_dict(loaded).items() if not k.startswith("runtime.") and k != "data.cache"
    }
    # --config <run>/recipe.yaml reproduces it: every value is now explicit
    again = Recipe(loaded, replicas=2, accelerator=True)
    again.before_data(PHOTOS)
    assert again.after_head(0.95) == chosen
    assert set(again.reasons.values()) == {"set in the config"}


def test_a_budget_too_short_for_phase_1_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(
        recipe_module, "measure_throughput", lambda cfg, res, depths: (20.0, {d: 5.0 for d in depths}, 10.0)
    )
    cfg = load_config(None, ["data.dataset=./photos", "runtime.time_budget_minutes=1"])
    with pytest.raises(
        recipe_module.UserError, match=r"time_budget_minutes=1 is too short .* at least \d+\.\d minutes"
    ):
        Recipe(cfg).before_data(PHOTOS)


def test_a_budget_shrinks_the_recipe_to_fit(monkeypatch):
    # 100 frozen images/s and 20 fine-tuning images/s at 160: 3,000 images take 2.5 min an epoch
    monkeypatch.setattr(
        recipe_module, "measure_throughput", lambda cfg, res, depths: (100.0, {d: 20.0 for d in depths}, 50.0)
    )
    cfg = load_config(None, ["data.dataset=./photos", "runtime.time_budget_minutes=6", "evaluate.enabled=false"])
    recipe = Recipe(cfg)
    start = recipe_module.time.perf_counter()
    chosen = recipe.before_data(PHOTOS, start)
    assert chosen.model.resolution < 160 or chosen.finetune.epochs < 3
    assert "time budget 6 min" in recipe.reasons["finetune.epochs"] + recipe.reasons.get("model.resolution", "")
    assert start < recipe.deadline < start + 6 * 60


def test_a_tiny_budget_stops_training_gracefully_and_ships(mock_cifar, tmp_path, monkeypatch):
    """The estimate is wrong (a plan that claims to fit): training stops at the deadline,
    the best head so far is tested and the run finishes."""
    from tlkeras.training import train_and_evaluate

    monkeypatch.setattr(
        recipe_module, "measure_throughput", lambda cfg, res, depths: (1e4, {d: 1e4 for d in depths}, 1.0)
    )
    monkeypatch.setattr(
        recipe_module,
        "plan_budget",
        lambda *a, **k: {"fits": True, "resolution": 32, "unfreeze": "block5", "finetune_epochs": 1, "estimate_s": 1},
    )
    # 12 s, less the slow passes of what follows training (1 image/s): the deadline passes
    # in set-up, and the trust report cannot fit
    overrides = tiny_overrides(
        **{"head.epochs": "50", "runtime.time_budget_minutes": "0.2", "evaluate.enabled": "true"}
    )
    summary = train_and_evaluate(load_config(None, overrides), tmp_path)
    # the report does not fit either: skipped, and said so; the exports are not
    assert summary["trust_report"] is None and summary["trust_report_skipped_for_budget"]
    assert not (tmp_path / "report.json").exists()
    head = summary["phases"]["head"]
    assert head["stopped_at_budget"] and head["epochs_run"] == 1
    assert "finetune" not in summary["phases"]  # the budget was spent
    assert summary["test_examples"] == 24 and (tmp_path / "model.keras").exists()
    assert summary["time_budget_minutes"] == 0.2
    assert load_config(tmp_path / "recipe.yaml").finetune.epochs == 0


def test_an_auto_run_on_a_folder_writes_its_recipe(tmp_path):
    from tlkeras.training import train_and_evaluate

    root = make_image_folder(tmp_path / "photos", {"ants": 12, "bees": 12}, size=(40, 30))
    overrides = [o for o in tiny_overrides() if o.split("=")[0] not in ("model.resolution", "data.batch_size")]
    overrides = [o for o in overrides if not o.startswith(("head.epochs", "finetune.unfreeze"))]
    cfg = load_config(None, [*overrides, f"data.dataset={root}"])
    summary = train_and_evaluate(cfg, tmp_path / "run")
    chosen = rundir.load_run_config(tmp_path / "run")
    # 30-pixel photos: 2x, to 64; 20 train images: batch 8; tiny data: the top block at 1e-5
    assert (chosen.model.resolution, chosen.data.batch_size) == (64, 8)
    assert (chosen.head.epochs, chosen.finetune.epochs) == (20, 1)
    assert (chosen.finetune.unfreeze, chosen.finetune.learning_rate) == ("block5", 1e-5)
    assert rundir.load_dataset(tmp_path / "run").storage_size == 64 and summary["recipe"] == "recipe.yaml"
    assert "# Why:" in (tmp_path / "run" / "recipe.yaml").read_text()


R = recipe_module
CUT_AND_TEST = (600, R.START_S)  # the cut epoch's 300 val images and the 300 test images


@pytest.mark.parametrize(
    "overrides, parts",
    [
        (["evaluate.enabled=false", "evaluate.fold_temperature=false", "export.enabled=false"], [CUT_AND_TEST]),
        (["evaluate.enabled=false", "export.enabled=false"], [CUT_AND_TEST, (300, R.CALIBRATION_S)]),  # + val T
        (
            ["evaluate.enabled=false", "export.litert=false", "export.int8_onnx=false"],
            [CUT_AND_TEST, (300, R.CALIBRATION_S), (0, R.EXPORT_S)],
        ),
        # every export: LiteRT and two int8 variants, each calibrated on 256 images and gated on 300
        (
            ["evaluate.enabled=false"],
            [CUT_AND_TEST, (300, R.CALIBRATION_S), (2 * (R.INT8_CALIBRATION_PASSES * 256 + 300), 40.0)],
        ),
        # the quick report: 2 x 300 test, 300 val, 40 corrupted and 32 attacked images
        (["export.enabled=false"], [CUT_AND_TEST, (600 + 300 + 40 * 53 + 32 * 54, R.REPORT_S)]),
    ],
)
def test_what_follows_training_is_charged_to_the_budget(overrides, parts):
    cfg = load_config(None, ["data.dataset=./photos", *overrides])
    charged = recipe_module.after_training(cfg, PHOTOS)
    assert list(charged) == list(recipe_module.AFTER_PARTS)
    assert [part for part in charged.values() if part != (0, 0.0)] == parts


def test_a_small_run_is_not_charged_for_the_passes_its_report_skips():
    cfg = load_config(None, ["data.dataset=./photos", "export.enabled=false"])
    small = Survey(num_train=221, num_val=24, num_test=153, short_side=375)
    assert recipe_module.after_training(cfg, small)["report"] == (2 * 153 + 24, recipe_module.REPORT_S)


def _budget_recipe(monkeypatch, minutes=10, feature_ips=100.0, finetune_ips=20.0, data=PHOTOS):
    monkeypatch.setattr(
        recipe_module,
        "measure_throughput",
        lambda cfg, res, depths: (feature_ips, {d: finetune_ips for d in depths}, feature_ips / 3),
    )
    cfg = load_config(None, ["data.dataset=./photos", f"runtime.time_budget_minutes={minutes}"])
    recipe = Recipe(cfg)
    recipe.before_data(data, start=recipe_module.time.perf_counter())
    return recipe


def test_a_slower_run_than_measured_moves_the_deadline_earlier(monkeypatch):
    as_measured, slower = _budget_recipe(monkeypatch, 30), _budget_recipe(monkeypatch, 30)
    now = slower.end - 1500
    as_planned = as_measured.after_head(0.95, now=now, feature_images_per_s=as_measured.feature_ips)
    # phase 1's feature pass ran at half the measured speed: what follows will too
    chosen = slower.after_head(0.95, now=now, feature_images_per_s=slower.feature_ips / 2)
    assert slower.slowdown == 2.0 and as_measured.slowdown == 1.0
    assert slower.end - slower.deadline == pytest.approx(2 * (as_measured.end - as_measured.deadline))
    # fewer fine-tuning epochs, those that fit the time left at the slower speed
    assert 1 <= chosen.finetune.epochs < as_planned.finetune.epochs
    epoch_s = 2 * (
        PHOTOS.num_train / slower.finetune_ips[chosen.finetune.unfreeze] + PHOTOS.num_val / slower.feature_ips
    )
    assert chosen.finetune.epochs * epoch_s <= slower.deadline - now
    # a freak measurement is bounded
    slower.observe(100.0)
    assert slower.slowdown == 4.0


def test_the_trust_report_is_affordable_only_with_the_exports_after_it(monkeypatch):
    recipe = _budget_recipe(monkeypatch)
    export_s = recipe.seconds("export")
    report_s = recipe.seconds("report")
    assert report_s > 0 and export_s > 0
    assert recipe.affordable("report", now=recipe.end - report_s - export_s - 1)
    assert not recipe.affordable("report", now=recipe.end - report_s - export_s + 1)
    assert recipe.affordable("export", now=recipe.end - export_s - 1)
    assert Recipe(load_config(None, ["data.dataset=./photos"])).affordable("report", now=1e12)  # no budget


def test_deadline_stop_measures_the_steps_and_stops_at_the_deadline(monkeypatch):
    recipe = _budget_recipe(monkeypatch, 30)
    clock = iter(range(int(recipe.end) - 1500, int(recipe.end), 5))  # a step every 5 s
    monkeypatch.setattr(recipe_module.time, "perf_counter", lambda: float(next(clock)))
    stop = recipe_module.DeadlineStop(recipe, images_per_call=10, planned_images_per_s=4.0)
    stop.set_model(type("M", (), {"stop_training": False})())
    stop.on_epoch_begin(0)
    for step in range(6):
        stop.on_train_batch_end(step)
    # 10 images every 5 s = 2 images/s where 4 were planned: half speed, so all estimates double
    assert recipe.slowdown == 2.0 and not stop.stopped
    while not stop.stopped:
        stop.on_train_batch_end(0)
    assert stop.model.stop_training and stop.last >= recipe.deadline


def test_a_resumed_budget_run_keeps_its_recipe_and_counts_the_time_spent_before(monkeypatch, tmp_path, caplog):
    import os
    import time

    first = _budget_recipe(monkeypatch, 10)
    chosen = first.after_head(0.95, now=first.end - 500, feature_images_per_s=first.feature_ips)
    first.write(tmp_path)
    # the first start 1,000 s ago; the last file written 120 s after it, then a kill
    started = time.time() - 1000
    saved = rundir.read_json(tmp_path / "budget.json")
    rundir.write_json(tmp_path / "budget.json", {**saved, "started": started})
    for path in tmp_path.iterdir():
        os.utime(path, (started + 120, started + 120))
    caplog.set_level("INFO", logger="tlkeras")
    resumed = Recipe(load_config(None, ["data.dataset=./photos", "runtime.time_budget_minutes=10"]))
    start = recipe_module.time.perf_counter()
    assert resumed.before_data(PHOTOS, start, resumed=tmp_path) == chosen
    assert resumed.end == pytest.approx(start + 600 - 120, abs=1)
    assert "2.0 of 10 minutes were spent" in caplog.text
    resumed.log("before training")
    # the time left is not re-planned: a resumed schedule must equal the interrupted one
    assert resumed.after_head(0.5, now=resumed.end - 10, feature_images_per_s=1.0) == chosen
    resumed.log("after phase 1")
    assert caplog.text.count("recipe (") == 1  # the same table is not shown twice


def test_a_budget_leaves_out_the_trust_report_before_refusing(monkeypatch, caplog):
    # the shipped model measured at 8 images/s (planned at 14): the report takes 5 min; phase 1 and
    # the exports fit in 12
    with_report = _budget_recipe(monkeypatch, 60, feature_ips=100.0, finetune_ips=20.0)
    assert not with_report.report_dropped and not with_report.skips_report(now=with_report.end - 3000)
    monkeypatch.setattr(
        recipe_module, "measure_throughput", lambda cfg, res, depths: (100.0, {d: 20.0 for d in depths}, 8.0)
    )
    cfg = load_config(None, ["data.dataset=./photos", "runtime.time_budget_minutes=12", "model.resolution=160"])
    recipe = Recipe(cfg)
    recipe.before_data(PHOTOS, start=recipe_module.time.perf_counter())
    assert recipe.report_dropped and recipe.skips_report()
    assert recipe.after["report"] == (PHOTOS.num_val, recipe_module.CALIBRATION_S)  # the val temperature only
    assert "trust report does not fit" in caplog.text


def test_a_large_budget_buys_more_fine_tuning_than_the_auto_count(monkeypatch):
    many = Survey(num_train=8000, num_val=800, num_test=800, short_side=375)
    auto = Recipe(load_config(None, ["data.dataset=./photos"])).before_data(many)
    budget = _budget_recipe(monkeypatch, 400, data=many)
    assert auto.finetune.epochs == 4 and budget.cfg.finetune.epochs == 10  # the CPU bound
    assert "time budget 400 min" in budget.reasons["finetune.epochs"]


def test_a_run_ahead_of_its_plan_spends_the_time_on_fine_tuning(monkeypatch):
    recipe = _budget_recipe(monkeypatch, 30)
    planned = recipe.cfg.finetune.epochs
    # phase 1 over at once, at the measured speed: more epochs fit than the plan kept for it
    chosen = recipe.after_head(0.95, now=recipe.end - recipe.budget_s, feature_images_per_s=recipe.feature_ips)
    assert planned < chosen.finetune.epochs <= recipe.finetune_max == 10
    assert "fit the time left after phase 1" in recipe.reasons["finetune.epochs"]


def test_a_feature_pass_too_short_to_measure_does_not_rescale_the_estimates(monkeypatch):
    recipe = _budget_recipe(monkeypatch, 30)
    # 80 photos in 3 s, mostly tracing: it looks 2x slow, but says nothing of the machine
    recipe.after_head(0.95, now=recipe.end - 1500, feature_images_per_s=recipe.feature_ips / 2, feature_seconds=3.0)
    assert recipe.slowdown == 1.0
    recipe.after_head(0.95, now=recipe.end - 1500, feature_images_per_s=recipe.feature_ips / 2, feature_seconds=40.0)
    assert recipe.slowdown == 2.0
