"""The bad-input suite: one readable line, a non-zero exit, no traceback, nothing lost."""

import pytest

from conftest import tiny_overrides
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
        ({"head.epochs": "two"}, 2, "config key 'head.epochs' must be int, got 'two'"),
        ({"head.epochs": "0"}, 2, "head.epochs=0 must be greater than 0"),
        ({"finetune.epochs": "-2"}, 2, "finetune.epochs=-2 must be 0 or more"),
        ({"data.batch_size": "0"}, 2, "data.batch_size=0 must be greater than 0"),
        ({"data.batch_size": "7", "runtime.strategy": "mirrored"}, 2,
         "data.batch_size=7 does not split evenly across 2 replicas; use a multiple of 2, e.g. 6 or 8"),
        ({"data.train_split": "train[:50"}, 2, "data.train_split='train[:50' is not a valid tfds split"),
        ({"finetune.unfreeze": "block7"}, 2, "finetune.unfreeze='block7' names no VGG16 layer"),
        ({"model.weights": "/nonexistent/vgg.h5"}, 1, "model.weights='/nonexistent/vgg.h5': no such readable file"),
    ],
)  # fmt: skip
def test_bad_settings(mock_cifar, tmp_path, capsys, extra, code, message):
    got, err = run_train(capsys, "--run-dir", str(tmp_path / "run"), *sets(**extra))
    assert got == code and message in err


def test_missing_dataset_with_downloads_off(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _, err = run_train(capsys, "--run-dir", str(tmp_path / "run"),
                       *sets(**{"data.data_dir": str(tmp_path / "empty"), "data.download": "false"}))  # fmt: skip
    assert "tfds dataset 'cifar10' not found" in err and "data.download=true" in err
    _, err = run_train(capsys, "--run-dir", str(tmp_path / "run"),
                       *sets(**{"data.data_dir": str(tmp_path / "none"), "data.download": "false"}))  # fmt: skip
    assert "data.data_dir='" in err and "no such folder" in err


def test_run_folder_not_writable(mock_cifar, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _, err = run_train(capsys, "--run-dir", str(blocker / "run"), *sets())
    assert f"run folder '{blocker / 'run'}' is not writable" in err


def test_finished_run_folder_is_refused_and_kept(mock_cifar, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--run-dir", str(run), *sets(**{"finetune.epochs": "0"})]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _, err = run_train(capsys, "--run-dir", str(run), *sets(**{"finetune.epochs": "0"}))
    assert "holds a finished run" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


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
            model.compile(optimizer=model.optimizer, loss=nan_loss, metrics=["accuracy"],
                          jit_compile=cfg.runtime.jit_compile,
                          steps_per_execution=cfg.runtime.steps_per_execution)  # fmt: skip

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
