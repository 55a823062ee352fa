"""Mid-epoch resume and graceful stops (tlkeras/resume.py), on mocked CIFAR with tiny shapes."""

import csv
import logging
import os
import signal
from unittest import mock

import h5py
import keras
import numpy as np
import pytest
from conftest import tiny_overrides

from tlkeras.config import load_config
from tlkeras.resume import GracefulStop, Preempted
from tlkeras.train import main
from tlkeras.training import train_and_evaluate

# 24 mocked images in batches of 8: 3 steps per epoch; a backup after every step.
OVERRIDES = {
    "head.epochs": "1",
    "finetune.epochs": "2",
    "runtime.backup_minutes": "1e-9",
    "runtime.deterministic": "true",
    "runtime.mixed_precision": "float32",
}


class Crash(Exception):
    pass


def finetuning(model):
    """Phase 2 is the phase with a learning-rate schedule."""
    return isinstance(model.optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def watch(crash_at_step=None):
    """Records every fine-tuning step's (optimizer step, learning rate) and the labels of
    the batches each fit is given; raises Crash after fine-tuning step `crash_at_step`."""
    steps, labels = [], []
    real_fit = keras.Model.fit

    def fit(self, x, *args, **kwargs):
        if finetuning(self):
            labels.extend(np.concatenate([y.numpy() for _, y in x]).tolist())  # same seeds: same batches
        return real_fit(self, x, *args, **kwargs)

    def on_train_batch_begin(self, batch, logs=None):
        if finetuning(self.model):
            steps.append((int(self.model.optimizer.iterations), float(self.model.optimizer.learning_rate)))

    def on_train_batch_end(self, batch, logs=None):
        if finetuning(self.model) and int(self.model.optimizer.iterations) == crash_at_step:
            raise Crash  # before StepBackup (the last callback) saves this step: it is redone

    patches = [
        mock.patch.object(keras.Model, "fit", fit),
        mock.patch.object(keras.callbacks.TerminateOnNaN, "on_train_batch_begin", on_train_batch_begin),
        mock.patch.object(keras.callbacks.TerminateOnNaN, "on_train_batch_end", on_train_batch_end),
    ]
    return steps, labels, patches


def run(cfg, run_dir, crash_at_step=None):
    steps, labels, patches = watch(crash_at_step)
    with patches[0], patches[1], patches[2]:
        try:
            summary = train_and_evaluate(cfg, run_dir)
        except Crash:
            summary = None
    return summary, steps, labels


def test_a_kill_mid_epoch_resumes_at_the_step_with_the_same_batches_and_schedule(mock_cifar, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tlkeras")
    cfg = load_config(None, tiny_overrides(**OVERRIDES))
    clean, steps, labels = run(cfg, tmp_path / "clean")
    assert [s for s, _ in steps] == list(range(6))  # 2 fine-tuning epochs x 3 steps

    killed = tmp_path / "killed"
    assert run(cfg, killed, crash_at_step=5)[0] is None  # the 2nd step of the 2nd epoch ran, unsaved
    with h5py.File(killed / "backup" / "finetune" / "latest.weights.h5") as f:
        assert "tlkeras_metrics" in f.attrs
    summary, resumed_steps, resumed_labels = run(cfg, killed)

    # Continues at optimizer step 4 (epoch 2, batch 2): one step redone, none skipped,
    # the same learning rate at each step and the same batches as the clean run.
    assert resumed_steps == steps[4:]
    assert resumed_labels == labels[4 * 8 :]
    assert "finetune: resuming at epoch 3, step 2 of 3" in (killed / "train.log").read_text()
    # Every epoch once, and with op determinism the very same numbers as the clean run.
    assert [r["epoch"] for r in rows(killed)] == ["0", "1", "2"]
    assert rows(killed) == rows(tmp_path / "clean")
    assert summary["weights_sha256"] == clean["weights_sha256"]
    assert not (killed / "backup" / "finetune").exists()


def test_sigterm_mid_epoch_saves_a_backup_and_exits_143(mock_cifar, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tlkeras")
    args = [a for kv in tiny_overrides(**{**OVERRIDES, "runtime.backup_minutes": "0"}) for a in ("--set", kv)]
    run_dir = tmp_path / "run"

    def on_train_batch_begin(self, batch, logs=None):
        if finetuning(self.model) and int(self.model.optimizer.iterations) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, mid-step

    with mock.patch.object(keras.callbacks.TerminateOnNaN, "on_train_batch_begin", on_train_batch_begin):
        code = main(["--run-dir", str(run_dir), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 143
    assert err[-1].startswith("stopped: SIGTERM: training stopped after step 2 of 3 in epoch 3 (backup saved)")
    assert f"--run-dir '{run_dir}'" in err[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    with h5py.File(
        run_dir / "backup" / "finetune" / "latest.weights.h5"
    ) as f:  # backups are off, but a stop writes one
        assert f["optimizer/vars/0"][()] == 5

    assert main(["--run-dir", str(run_dir), *args]) == 0
    assert [r["epoch"] for r in rows(run_dir)] == ["0", "1", "2"]
    assert "finetune: resuming at epoch 3, step 3 of 3" in (run_dir / "train.log").read_text()


def test_a_signal_outside_the_steps_stops_at_once_and_a_second_exits_at_once():
    with GracefulStop():
        with pytest.raises(Preempted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.exit_code == 130 and "SIGINT" in str(e.value)
        with mock.patch("os._exit", side_effect=SystemExit) as exit_now:
            with pytest.raises(SystemExit):
                os.kill(os.getpid(), signal.SIGTERM)
        exit_now.assert_called_once_with(143)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_during_steps_waits_for_the_step_boundary():
    with GracefulStop() as stop:
        stop.deferred = True  # as StepBackup sets it while fit runs steps
        os.kill(os.getpid(), signal.SIGTERM)  # noted, nothing raised
        assert stop.requested and stop.error("here").exit_code == 143


def test_resume_continues_the_interrupted_run_of_the_same_command(mock_cifar, tmp_path, monkeypatch, capsys, caplog):
    """A stopped run in runs/<time>-<name> is found by --resume alone: no folder name needed."""
    caplog.set_level(logging.INFO, logger="tlkeras")
    monkeypatch.chdir(tmp_path)
    args = [a for kv in tiny_overrides(**{**OVERRIDES, "runtime.backup_minutes": "0"}) for a in ("--set", kv)]

    def on_train_batch_begin(self, batch, logs=None):
        if finetuning(self.model) and int(self.model.optimizer.iterations) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with mock.patch.object(keras.callbacks.TerminateOnNaN, "on_train_batch_begin", on_train_batch_begin):
        assert main(args) == 143
    (run,) = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--run-dir '{run.relative_to(tmp_path)}' (or with --resume) to resume" in err[-1]

    assert main(["--resume", *args]) == 0
    assert list((tmp_path / "runs").iterdir()) == [run]  # the same folder, no new one
    assert (run / "summary.json").exists()
    assert "finetune: resuming at epoch 3, step 3 of 3" in (run / "train.log").read_text()
    assert f"--resume: continuing the unfinished run in {run.relative_to(tmp_path)}" in caplog.text


def test_a_stop_before_training_started_names_no_removed_folder(mock_cifar, tmp_path, capsys):
    """Ctrl-C while the data loads: train removes the folder it made, and the hint says so."""
    args = [a for kv in tiny_overrides() for a in ("--set", kv)]
    run = tmp_path / "run"

    def interrupted(*a, **k):  # as Ctrl-C would, while the data is read
        os.kill(os.getpid(), signal.SIGINT)

    with mock.patch("tlkeras.training.make_datasets", interrupted):
        assert main(["--run-dir", str(run), *args]) == 130
    assert not run.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGINT: stopped before training started; nothing was saved")
    assert "rerun the same command to start again" in last and str(run) not in last

    run.mkdir()  # a folder the user made: kept, and then named
    (run / "notes.txt").write_text("mine")
    with mock.patch("tlkeras.training.make_datasets", interrupted):
        assert main(["--run-dir", str(run), *args]) == 130
    assert f"--run-dir '{run}'" in capsys.readouterr().err.strip().splitlines()[-1]
