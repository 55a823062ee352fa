"""The run folder's one-writer lock (tlkeras/rundir.py)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from tlkeras import rundir
from tlkeras.config import dump_yaml, load_config
from tlkeras.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    with rundir.locked(tmp_path):
        with pytest.raises(
            UserError, match=rf"run folder '{tmp_path}' is in use by another tlkeras process \(pid {os.getpid()} on "
        ):
            with rundir.locked(tmp_path):
                pass
    with rundir.locked(tmp_path):  # released at the end of the block
        pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from tlkeras import rundir\n"
            "with rundir.locked(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid} "):
        with rundir.locked(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with rundir.locked(tmp_path):  # the kernel dropped the dead process's lock
        assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()


def test_train_into_a_folder_in_use_is_refused_at_once(mock_cifar, tmp_path):
    from tlkeras.training import train_and_evaluate

    cfg = load_config(None, tiny_overrides())
    with rundir.locked(tmp_path):
        with pytest.raises(UserError, match="is in use by another tlkeras process"):
            train_and_evaluate(cfg, tmp_path)
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "config.yaml").exists()


def test_export_into_a_base_in_use_is_refused(tmp_path):
    from tlkeras.config import dump_yaml
    from tlkeras.data import DatasetInfo
    from tlkeras.export import export_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")  # refused before it is read
    (run / "config.yaml").write_text(dump_yaml(load_config(None)))
    rundir.write_json(run / rundir.DATASET, DatasetInfo("x", "tfds", ("a", "b"), 32).to_dict())
    with rundir.locked(tmp_path / "base", "export base"):
        with pytest.raises(UserError, match="export base .* is in use"):
            export_run(run, tmp_path / "base")


def test_damaged_run_files_are_one_line_naming_them(tmp_path):
    from tlkeras.errors import UserError

    (tmp_path / "summary.json").write_text('{"test_accuracy": ')
    with pytest.raises(UserError, match=r"summary.json' is not valid JSON .*: the file is damaged"):
        rundir.read_json(tmp_path / "summary.json")
    assert rundir.read_json(tmp_path / "missing.json") is None
    (tmp_path / rundir.DATASET).write_text("{}")
    with pytest.raises(UserError, match=r"dataset.json' is damaged \(KeyError"):
        rundir.load_dataset(tmp_path)


def test_resume_finds_the_latest_unfinished_run_with_the_same_config(tmp_path):
    import time

    cfg = load_config(None, tiny_overrides())
    other = load_config(None, tiny_overrides(**{"head.epochs": "2"}))
    runs = tmp_path / "runs"
    assert rundir.find_unfinished(cfg, runs) is None  # no runs/ at all

    def make(name, config, finished=False, age=0):
        folder = runs / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(dump_yaml(config))
        os.utime(folder / "config.yaml", (time.time() - age, time.time() - age))
        if finished:
            (folder / rundir.SUMMARY).write_text("{}")
        return folder

    older = make("older", cfg, age=100)
    assert rundir.find_unfinished(cfg, runs) == older
    make("finished", cfg, finished=True)  # never reused, however recent
    make("other-config", other)  # a different --set is another run
    (runs / "not-a-run").mkdir()
    make("damaged", cfg).joinpath("config.yaml").write_text("data: [")
    assert rundir.find_unfinished(cfg, runs) == older
    newer = make("newer", cfg, age=10)
    assert rundir.find_unfinished(cfg, runs) == newer
    assert rundir.find_unfinished(other, runs) == runs / "other-config"
