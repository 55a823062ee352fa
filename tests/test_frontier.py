"""The frontier command: points read from run folders, a table and a plot."""

import json

import pytest

from tlkeras import frontier
from tlkeras.config import dump_yaml, load_config


def _run(root, name, backbone, train, minutes, accuracy, finished=True, budget=None):
    run = root / name
    run.mkdir()
    cfg = load_config(
        None,
        [
            f"model.backbone={backbone}",
            "model.resolution=96",
            "finetune.epochs=10",  # a run before recipes: no recipe.yaml, every value in config.yaml
            "finetune.unfreeze=block_13" if backbone == "mobilenet_v2" else "finetune.unfreeze=block3",
        ],
    )
    (run / "config.yaml").write_text(dump_yaml(cfg))
    if finished:
        summary = {"test_accuracy": accuracy, "wall_time_s": minutes * 60, "time_budget_minutes": budget}
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "dataset.json").write_text(json.dumps({"num_train": train}))
    return run


def test_points_table_and_plot(tmp_path, capsys):
    runs = [
        _run(tmp_path, "a", "vgg16", 5000, 16.0, 0.8568),
        _run(tmp_path, "b", "mobilenet_v2", 5000, 9.5, 0.88, budget=10),
        _run(tmp_path, "c", "mobilenet_v2", 48000, 25.0, 0.93),
        _run(tmp_path, "d", "vgg16", 48000, 50.0, 0.91, finished=False),
    ]
    (tmp_path / "a.log").write_text("a log beside the runs, as a shell glob yields it")
    out = tmp_path / "frontier.png"
    assert frontier.main([str(r) for r in runs] + [str(tmp_path / "a.log"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    rows = [
        line
        for line in printed.out.splitlines()
        if line.startswith("| ") and "runs" not in line and "---" not in line and "base |" not in line
    ]
    assert len(rows) == 3  # the unfinished run is skipped, and said so
    assert "skipped" in printed.err and "/d" in printed.err
    # sorted: size, base, time; with a budget, the wall time over it
    assert rows[0].startswith("| mobilenet_v2 | 5000 | 96 | block_13 | 10 | 9.5 | 10 min, 0.95x | 0.8800")
    assert "| 16.0 | - | 0.8568 |" in rows[1]
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert frontier.read_point(runs[1])["minutes"] == 9.5


def test_damaged_or_missing_folders_are_skipped_with_the_reason(tmp_path, capsys):
    good = _run(tmp_path, "a", "vgg16", 5000, 16.0, 0.8568)
    bad_json = _run(tmp_path, "b", "vgg16", 5000, 16.0, 0.8568)
    (bad_json / "summary.json").write_text("{bad")
    no_keys = _run(tmp_path, "c", "vgg16", 5000, 16.0, 0.8568)
    (no_keys / "summary.json").write_text("[]")
    out = tmp_path / "f.png"
    args = [str(good), str(bad_json), str(no_keys), str(tmp_path / "nope"), "--out", str(out)]
    assert frontier.main(args) == 0
    err = capsys.readouterr().err
    assert "/b: unreadable summary.json" in err and "/c: unreadable" in err and "nope' not found" in err
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("where", ["folder", "missing_parent"])
def test_a_bad_out_path_is_one_line_before_any_work(tmp_path, capsys, where):
    good = _run(tmp_path, "a", "vgg16", 5000, 16.0, 0.8568)
    out = tmp_path if where == "folder" else tmp_path / "no" / "f.png"
    assert frontier.main([str(good), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "--out" in printed.err and "| base |" not in printed.out


def test_no_finished_run_is_one_error_line(tmp_path, capsys):
    run = _run(tmp_path, "d", "vgg16", 48000, 50.0, 0.91, finished=False)
    assert frontier.main([str(run), "--out", str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 1 paths") and not (tmp_path / "f.png").exists()
