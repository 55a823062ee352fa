"""The bad-input suite: one readable line, a non-zero exit, no traceback, nothing lost."""

import os

import pytest
from conftest import make_image_folder, tiny_overrides

from tlkeras.train import main


def run_train(capsys, *args):
    code = main(list(args))
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    # Progress may come first; the run ends with exactly one error line and no traceback.
    assert lines and lines[-1].startswith("error: "), lines[-3:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert "Traceback" not in stderr
    return code, lines[-1]


def sets(**extra):
    return [a for kv in tiny_overrides(**extra) for a in ("--set", kv)]


@pytest.mark.parametrize(
    "extra, code, message",
    [
        ({"data.batchsize": "8"}, 2, "unknown config key 'data.batchsize'; did you mean 'data.batch_size'?"),
        ({"head.epochs": "two"}, 2, "config key 'head.epochs' must be int or 'auto', got 'two'"),
        ({"head.epochs": "0"}, 2, "head.epochs=0 must be greater than 0"),
        ({"finetune.epochs": "-2"}, 2, "finetune.epochs=-2 must be 0 or more"),
        ({"data.batch_size": "0"}, 2, "data.batch_size=0 must be greater than 0"),
        (
            {"data.batch_size": "7", "runtime.strategy": "mirrored"},
            2,
            "data.batch_size=7 does not split evenly across 2 replicas; use a multiple of 2, e.g. 6 or 8",
        ),
        ({"data.train_split": "train[:50"}, 2, "data.train_split='train[:50' is not a valid tfds split"),
        ({"finetune.unfreeze": "block7"}, 2, "finetune.unfreeze='block7' names no VGG16 layer"),
        ({"model.weights": "/nonexistent/vgg.h5"}, 1, "model.weights='/nonexistent/vgg.h5': no such readable file"),
    ],
)
def test_bad_settings(mock_cifar, tmp_path, capsys, extra, code, message):
    got, err = run_train(capsys, "--run-dir", str(tmp_path / "run"), *sets(**extra))
    assert got == code and message in err


def test_missing_dataset_with_downloads_off(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _, err = run_train(
        capsys,
        "--run-dir",
        str(tmp_path / "run"),
        *sets(**{"data.data_dir": str(tmp_path / "empty"), "data.download": "false"}),
    )
    assert "tfds dataset 'cifar10' not found" in err and "data.download=true" in err
    _, err = run_train(
        capsys,
        "--run-dir",
        str(tmp_path / "run"),
        *sets(**{"data.data_dir": str(tmp_path / "none"), "data.download": "false"}),
    )
    assert "data.data_dir='" in err and "no such folder" in err


def test_data_refused_before_training_leaves_no_run_folder(tmp_path, capsys):
    root = make_image_folder(tmp_path / "one", {"cats": 4})
    _, err = run_train(capsys, "--run-dir", str(tmp_path / "runs" / "run"), *sets(**{"data.dataset": str(root)}))
    assert "has one class" in err and not (tmp_path / "runs").exists()  # nor the runs/ it made
    assert "preparing" not in err and "recipe" not in err  # refused from the listing, before any work
    (tmp_path / "kept").mkdir()  # a folder the user made is theirs: only its start-up files are written
    run_train(capsys, "--run-dir", str(tmp_path / "kept"), *sets(**{"data.dataset": str(root)}))
    assert (tmp_path / "kept" / "train.log").is_file()


def test_run_folder_not_writable(mock_cifar, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _, err = run_train(capsys, "--run-dir", str(blocker / "run"), *sets())
    assert f"run folder '{blocker / 'run'}' is not writable" in err


def test_finished_run_folder_is_refused_and_kept(mock_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), *sets(**{"finetune.epochs": "0"})]) == 0
    capsys.readouterr()
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()  # .lock names its latest holder, the refused run included
    _, err = run_train(capsys, "--run-dir", str(run), *sets(**{"finetune.epochs": "0"}))
    assert "holds a finished run" in err
    assert files() == before


def test_nan_loss_stops_and_deletes_the_diverged_checkpoint(mock_cifar, tmp_path, capsys, monkeypatch):
    import keras

    from tlkeras import training

    real_compile, real_drop = training.compile_for_phase, training._drop_if_not_finite
    dropped = []

    def nan_loss(y, p):
        return keras.losses.sparse_categorical_crossentropy(y, p) * float("nan")

    def diverging(model, cfg, phase, steps):
        # A NaN loss in phase 2 every time. A huge learning rate gave NaN in only 4 of 6
        # probes (the clipped cross-entropy can saturate at a finite loss instead).
        real_compile(model, cfg, phase, steps)
        if phase == "finetune":
            model.compile(
                optimizer=model.optimizer,
                loss=nan_loss,
                metrics=["accuracy"],
                jit_compile=cfg.runtime.jit_compile,
                steps_per_execution=cfg.runtime.steps_per_execution,
            )

    def spy(model, path):
        existed = path.exists()
        dropped.append((existed, real_drop(model, path)))
        return dropped[-1][1]

    monkeypatch.setattr(training, "compile_for_phase", diverging)
    monkeypatch.setattr(training, "_drop_if_not_finite", spy)
    run = tmp_path / "run"
    # Two fine-tuning epochs: without TerminateOnNaN the run would go on to epoch 3.
    code, err = run_train(capsys, "--run-dir", str(run), *sets(**{"finetune.epochs": "2"}))
    assert code == 1
    assert "finetune: the loss became NaN/inf in epoch 2" in err and "Lower finetune.learning_rate" in err
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "head_best.weights.h5").exists()  # phase 1's stays
    # Epoch 2 wrote a checkpoint from the diverged model; it was deleted, not kept as best.
    assert dropped == [(True, False)]
    assert "no good weights were saved in this phase" in err
    assert not (run / "checkpoints" / "finetune_best.weights.h5").exists()


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    from tlkeras import train

    with pytest.raises(SystemExit) as stop:
        train.main(["--epochs", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs 3" in err and "usage" not in err


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "the TF_CONFIG environment variable is not valid JSON"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', "has no 'task' with a 'type' and an 'index'"),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
            "task index 2 is out of range: cluster.worker lists 2 address(es), so 0 to 1",
        ),
    ],
)
def test_bad_tf_config_is_one_line_before_tensorflow_starts(tmp_path, capsys, monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    code, err = run_train(capsys, "--run-dir", str(tmp_path / "run"), *sets())
    assert code == 1 and message in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- full disks


def no_space(path):
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_writing_a_json_file_keeps_the_old_one(tmp_path, monkeypatch):
    from pathlib import Path

    from tlkeras import rundir
    from tlkeras.errors import UserError

    path = tmp_path / "summary.json"
    rundir.write_json(path, {"old": 1})

    def half_then_full(self, text):
        Path.write_bytes(self, text.encode()[:3])
        raise no_space(self)

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(
        UserError,
        match=r"no space left on the device while writing 'summary.json' to '.*\.tmp-\d+-summary\.json' \(\d+ MB free",
    ):
        rundir.write_json(path, {"new": 2})
    monkeypatch.undo()
    assert rundir.read_json(path) == {"old": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _tiny_model():
    import keras

    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dropout(0.5), keras.layers.Dense(2, activation="softmax")]
    )
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    return model


def _full_disk_save_weights(monkeypatch):
    """keras.Model.save_weights writes a few bytes of its file, then the disk is full."""
    import keras

    def save_weights(self, filepath, overwrite=True, **kwargs):
        open(filepath, "wb").write(b"\x89HDF partial")
        raise OSError(
            "Unable to synchronously write file (file write failed: errno = 28, "
            f"error message = 'No space left on device', name = '{filepath}')"
        )

    monkeypatch.setattr(keras.Model, "save_weights", save_weights)


def test_full_disk_writing_a_backup_keeps_the_previous_backup(tmp_path, monkeypatch):
    import numpy as np

    from tlkeras.errors import UserError
    from tlkeras.resume import StepBackup

    model = _tiny_model()
    backup = StepBackup(tmp_path / "backup", steps=3, every_s=0)
    backup.set_model(model)
    backup._save_model()
    before = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in before])
    _full_disk_save_weights(monkeypatch)
    with pytest.raises(UserError, match=r"no space left on the device while writing the resume backup .* MB needed\)"):
        backup._save_model()
    monkeypatch.undo()
    again = _tiny_model()
    StepBackup(tmp_path / "backup", steps=3, every_s=0).restore(again)
    for a, b in zip(again.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in (tmp_path / "backup").iterdir()] == ["latest.weights.h5"]


def test_full_disk_writing_the_best_checkpoint_keeps_the_previous_best(tmp_path, monkeypatch):
    from tlkeras.errors import UserError
    from tlkeras.training import WholeModelCheckpoint

    model = _tiny_model()
    path = tmp_path / "best.weights.h5"
    ckpt = WholeModelCheckpoint(
        model, str(path), monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True
    )
    ckpt.set_model(model)
    ckpt.on_epoch_end(0, {"val_accuracy": 0.5})
    before = path.read_bytes()
    _full_disk_save_weights(monkeypatch)
    with pytest.raises(UserError, match="while writing the best checkpoint to"):
        ckpt.on_epoch_end(1, {"val_accuracy": 0.9})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.weights.h5"]


def test_full_disk_writing_the_features_cache_keeps_the_cached_part(tmp_path, monkeypatch):
    import numpy as np

    from tlkeras.errors import UserError
    from tlkeras.training import load_or_compute_features

    old = (np.ones((4, 3), np.float32), np.arange(4))
    load_or_compute_features(tmp_path, "train", "A", lambda: old)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(file, **arrays):
        open(file, "wb").write(b"PK partial")
        raise no_space(file)

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(UserError, match="while writing the features cache"):
        load_or_compute_features(tmp_path, "train", "B", lambda: (old[0] * 2, old[1]))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    reused = load_or_compute_features(tmp_path, "train", "A", lambda: pytest.fail("recomputed"))
    np.testing.assert_array_equal(reused[0], old[0])


def test_full_disk_during_the_export_publishes_nothing_and_the_rerun_finishes(
    mock_cifar, tmp_path, capsys, monkeypatch
):
    import tensorflow as tf

    from tlkeras import export

    real = export.save_onnx

    def full(*args, **kwargs):
        raise tf.errors.UnknownError(None, None, "Failed to write: No space left on device")

    monkeypatch.setattr(export, "save_onnx", full)
    run = tmp_path / "run"
    args = ["--run-dir", str(run), *sets(**{"export.enabled": "true", "finetune.epochs": "0"})]
    code, err = run_train(capsys, *args)
    assert code == 1 and f"no space left on the device while writing the export to '{run / 'export'}'" in err
    assert "free some space and rerun the same command" in err
    assert not list((run / "export").rglob("saved_model.pb")) and not (run / "summary.json").exists()
    monkeypatch.setattr(export, "save_onnx", real)  # space freed
    assert main(args) == 0
    assert [p.name for p in (run / "export" / "tlkeras").iterdir()] == ["1"]


def test_a_backup_that_cannot_fit_is_refused_before_hdf5_starts_writing(tmp_path, monkeypatch):
    """HDF5 can crash the process when the disk fills mid-file: the space is checked first."""
    import shutil
    from collections import namedtuple

    import keras

    from tlkeras.errors import UserError
    from tlkeras.resume import StepBackup

    model = _tiny_model()
    backup = StepBackup(tmp_path / "backup", steps=3, every_s=0)
    backup.set_model(model)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    monkeypatch.setattr(keras.Model, "save_weights", lambda *a, **k: pytest.fail("written"))
    with pytest.raises(
        UserError,
        match=r"no space left on the device while writing the resume backup .*\(0 MB free, about \d+ MB needed\)",
    ):
        backup._save_model()
