"""tlkeras.doctor: label errors, duplicates, leaks, outliers; data.exclude."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder

from tlkeras import doctor
from tlkeras.config import load_config
from tlkeras.data import make_datasets

TINY = [
    "model.weights=null",
    "model.resolution=32",
    "data.storage_size=32",
    "data.batch_size=8",
    "doctor.folds=3",
    "doctor.near_duplicate_similarity=1.0",  # random weights: only identical features count
    "doctor.gallery_images=8",
]


def folder_with_problems(root: Path) -> Path:
    """train/{a,b} and val/{a,b} of coloured noise, plus: train/a/0.png copied into train/b
    (a cross-class duplicate), train/a/1.png copied into val/a (a leak), a blank image."""
    make_image_folder(root, {"train/a": 12, "train/b": 12, "val/a": 4, "val/b": 4})
    shutil.copy(root / "train/a/0.png", root / "train/b/copy_of_a0.png")
    shutil.copy(root / "train/a/1.png", root / "val/a/leaked_a1.png")
    from PIL import Image

    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(root / "train/b/blank.png")
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_label_issues_finds_flipped_labels_on_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (4, 16))
    labels = np.repeat(np.arange(4), 50)
    features = centres[labels] + rng.normal(0, 1, (len(labels), 16))
    flipped = rng.choice(len(labels), 10, replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + 1 + rng.integers(0, 3, 10)) % 4
    found = doctor.label_issues(features, noisy, folds=5, seed=0)
    hits = set(found["indices"]) & set(flipped)
    assert len(hits) == len(found["indices"]) and len(hits) >= 9  # precision 1, recall at least 0.9
    assert (found["suggested"][flipped] == labels[flipped]).all()  # the true class is suggested
    assert found["probe_accuracy"] >= 0.9
    assert (found["scores"][flipped] > 0.5).all()


def test_groups_and_scores_helpers():
    assert doctor.exact_groups(["x", "y", "x", "z", "y", "x"]) == [[0, 2, 5], [1, 4]]
    features = np.array([[1.0, 0], [1.0, 0.001], [0, 1.0], [-1.0, 0], [0, -1.0]])
    assert [(i, j) for i, j, _ in doctor.near_duplicate_pairs(features, 0.999)] == [(0, 1)]
    assert doctor.robust_low(np.array([0.5, 0.52, 0.48, 0.51, 0.49, 0.05]), 5).tolist() == [False] * 5 + [True]
    blank, noise = np.full((1, 8, 8, 3), 7, np.uint8), np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3))
    assert doctor.constant_share(np.concatenate([blank, noise.astype(np.uint8)])).round(2).tolist()[0] == 1.0
    assert doctor.balance({"a": 10, "b": 40})["imbalance_ratio"] == 4.0
    assert "class_weight" in doctor.balance({"a": 10, "b": 40})["advice"]


def test_doctor_report_csv_gallery_and_folder_untouched(tmp_path):
    data = folder_with_problems(tmp_path / "photos")
    before = tree_hashes(data)
    run = tmp_path / "run"
    code = doctor.main(["--run-dir", str(run), "--set", f"data.dataset={data}", *(f"--set={o}" for o in TINY)])
    assert code == 0
    assert tree_hashes(data) == before  # the user's folder is only read

    report = json.loads((run / "doctor.json").read_text())
    with (run / "flagged.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "issue", "given", "suggested", "score"]
    by_issue = {}
    for r in rows:
        by_issue.setdefault(r["issue"], set()).add(Path(r["path"]).relative_to(data).as_posix())
    # Cross-class duplicate: both copies flagged, each suggesting the other's class.
    assert {"train/a/0.png", "train/b/copy_of_a0.png"} <= by_issue["duplicate"]
    conflict = [r for r in rows if r["issue"] == "duplicate" and r["path"].endswith("copy_of_a0.png")][0]
    assert (conflict["given"], conflict["suggested"], float(conflict["score"])) == ("b", "a", 1.0)
    # Leak: the val copy, not the train original.
    assert by_issue["leak"] == {"val/a/leaked_a1.png"}
    assert "train/a/1.png" not in by_issue.get("duplicate", set())
    assert "train/b/blank.png" in by_issue["outlier"]
    assert set(by_issue) <= set(doctor.ISSUES)
    assert len(rows) == len({(r["path"], r["issue"]) for r in rows})  # one row per file and issue

    summary = report["summary"]
    assert summary["exact_duplicate_groups"] == 2 and summary["label_conflicts"] == 1 and summary["leaks"] == 1
    assert report["balance"]["counts"] == {"a": 17, "b": 18}
    assert report["images"] == 35
    for issue in ("duplicate", "leak", "outlier"):
        assert (run / f"gallery_{issue}.png").stat().st_size > 1000
    assert report["files"]["galleries"].get("label") in (None, "gallery_label.png")
    assert (run / "config.yaml").exists() and (run / "doctor.log").exists()

    # A second report into the same folder is refused rather than overwriting it.
    again = doctor.main(["--run-dir", str(run), "--set", f"data.dataset={data}", *(f"--set={o}" for o in TINY)])
    assert again == 1


def test_exclude_leaves_files_out_and_records_them(tmp_path, caplog):
    data = folder_with_problems(tmp_path / "photos")
    before = tree_hashes(data)
    flagged = tmp_path / "flagged.csv"
    flagged.write_text(
        "path,issue,given,suggested,score\n"
        f"{data}/val/a/leaked_a1.png,leak,a,,1.0\n"
        f"{data}/train/b/blank.png,outlier,b,near-constant image,0.99\n"
        f"{data}/train/b/blank.png,label,b,a,0.9\n"  # a file listed twice is left out once
        "train/b/copy_of_a0.png,duplicate,b,a,1.0\n"  # relative to the data folder
    )
    cfg = load_config(None, [f"data.dataset={data}", "data.storage_size=32", f"data.exclude={flagged}"])
    full = make_datasets(load_config(None, [f"data.dataset={data}", "data.storage_size=32"]).data)
    with caplog.at_level(logging.INFO, logger="tlkeras"):
        splits = make_datasets(cfg.data)
    info = splits.info
    # val/ is the test split; val is carved from train/
    assert (full.info.num_train + full.info.num_val, full.info.num_test) == (26, 9)
    assert (info.num_train + info.num_val, info.num_test) == (24, 8)
    assert sorted(Path(p).name for p in info.excluded) == ["blank.png", "copy_of_a0.png", "leaked_a1.png"]
    kept = [Path(p).name for role in ("train", "val", "test") for p in splits.files[role]]
    assert len(kept) == 32 and not {"blank.png", "copy_of_a0.png", "leaked_a1.png"} & set(kept)
    assert sum(int(y.shape[0]) for ds in (splits.train_plain, splits.val, splits.test) for _, y in ds) == 32
    assert "left out 3 images listed in data.exclude" in caplog.text
    assert json.loads(json.dumps(info.to_dict()))["excluded"] == list(info.excluded)  # dataset.json records them
    # The remaining images keep the splits they had without the exclusion.
    assert all(set(splits.files[r]) <= set(full.files[r]) for r in ("train", "val", "test"))
    assert tree_hashes(data) == before

    plain = tmp_path / "list.txt"
    plain.write_text(f"# one path per line\n{data}/train/a/3.png\n{data}/nowhere.png\n")
    with caplog.at_level(logging.INFO, logger="tlkeras"):
        one = make_datasets(
            load_config(None, [f"data.dataset={data}", "data.storage_size=32", f"data.exclude={plain}"]).data
        )
    assert one.info.num_train + one.info.num_val == 25
    assert "1 entries match no image" in caplog.text


def test_exclude_file_missing_is_one_line(tmp_path):
    from tlkeras.config import preflight
    from tlkeras.errors import UserError

    cfg = load_config(None, ["data.exclude=" + str(tmp_path / "missing.csv")])
    with pytest.raises(UserError, match="data.exclude=.*no such file"):
        preflight(cfg, tmp_path / "run")


def test_quick_check_logs_one_line_on_leaks(tmp_path, caplog):
    data = folder_with_problems(tmp_path / "photos")
    splits = make_datasets(load_config(None, [f"data.dataset={data}", "data.storage_size=32"]).data)
    with caplog.at_level(logging.INFO, logger="tlkeras"):
        line = doctor.quick_check(splits)
    assert "2 groups of identical files among 35 images, 1 spanning two splits" in line
    assert [r.levelname for r in caplog.records if r.message.startswith("doctor:")] == ["WARNING"]


def test_doctor_on_tfds(tmp_path, mock_cifar):
    run = tmp_path / "run"
    report = doctor.examine(load_config(None, ["data.dataset=cifar10", *TINY]), run)
    assert report["images"] == 24 * 3  # mocked: each split string reads 24 random examples
    assert report["dataset"]["source"] == "tfds" and (run / "flagged.csv").exists()


def test_training_warns_of_leaks_and_records_what_it_left_out(tmp_path):
    from conftest import tiny_overrides

    from tlkeras.training import train_and_evaluate

    data = folder_with_problems(tmp_path / "photos")
    excluded = tmp_path / "exclude.txt"
    excluded.write_text(f"{data}/train/b/blank.png\n")
    overrides = {"data.dataset": str(data), "data.storage_size": "32", "data.exclude": str(excluded)}
    run = tmp_path / "run"
    train_and_evaluate(load_config(None, tiny_overrides(**overrides, **{"finetune.epochs": "0"})), run)
    assert json.loads((run / "dataset.json").read_text())["excluded"] == [f"{data}/train/b/blank.png"]
    log = (run / "train.log").read_text()
    assert "WARNING doctor: 2 groups of identical files among 34 images, 1 spanning two splits" in log

    quiet = tmp_path / "quiet"
    overrides["data.doctor"] = "false"
    train_and_evaluate(load_config(None, tiny_overrides(**overrides, **{"finetune.epochs": "0"})), quiet)
    assert "doctor:" not in (quiet / "train.log").read_text()
