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
    assert chosen.finetune.epochs == 3  # BiT's 256,000 images seen / 32 on a CPU, over 3,000
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
    monkeypatch.setattr(recipe_module, "measure_throughput", lambda cfg, res, depths: (20.0, {d: 5.0 for d in depths}))
    cfg = load_config(None, ["data.dataset=./photos", "runtime.time_budget_minutes=1"])
    with pytest.raises(
        recipe_module.UserError, match=r"time_budget_minutes=1 is too short .* at least \d+\.\d minutes"
    ):
        Recipe(cfg).before_data(PHOTOS)


def test_a_budget_shrinks_the_recipe_to_fit(monkeypatch):
    # 100 frozen images/s and 20 fine-tuning images/s at 160: 3,000 images take 2.5 min an epoch
    monkeypatch.setattr(
        recipe_module, "measure_throughput", lambda cfg, res, depths: (100.0, {d: 20.0 for d in depths})
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

    monkeypatch.setattr(recipe_module, "measure_throughput", lambda cfg, res, depths: (1e4, {d: 1e4 for d in depths}))
    monkeypatch.setattr(
        recipe_module,
        "plan_budget",
        lambda *a, **k: {"fits": True, "resolution": 32, "unfreeze": "block5", "finetune_epochs": 1, "estimate_s": 1},
    )
    # 12 s, less START_S (10 s) for what follows training: the deadline passes in set-up
    overrides = tiny_overrides(**{"head.epochs": "50", "runtime.time_budget_minutes": "0.2"})
    summary = train_and_evaluate(load_config(None, overrides), tmp_path)
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


@pytest.mark.parametrize(
    "overrides, images, fixed",
    [
        (["evaluate.enabled=false", "evaluate.fold_temperature=false", "export.enabled=false"], 300, 20.0),
        (["evaluate.enabled=false", "export.enabled=false"], 600, 70.0),  # + val temperature
        (["evaluate.enabled=false", "export.litert=false", "export.int8_onnx=false"], 600, 140.0),
        # every export: LiteRT and two int8 variants, each 256 calibration images + 300 gated
        (["evaluate.enabled=false"], 600 + 2 * 556, 180.0),
        # the quick report: 2 x 300 test, 300 val, 1,400 corrupted, 4,500 attack passes
        (["export.enabled=false"], 300 + 600 + 300 + 1400 + 4500, 20.0),
    ],
)
def test_what_follows_training_is_charged_to_the_budget(overrides, images, fixed):
    cfg = load_config(None, ["data.dataset=./photos", *overrides])
    assert recipe_module.after_training(cfg, PHOTOS) == (images, fixed)
