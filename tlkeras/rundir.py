"""The run folder: what is written first, how a rerun resumes, atomic writes.

runs/<timestamp>-<name>/
  config.yaml  environment.json  train.log       written first / appended
  recipe.yaml                                    the config with every "auto" resolved (tlkeras.recipe)
  budget.json                                    with a time budget: the speeds measured, the first start
  dataset.json                                   DatasetInfo: class names, storage size, counts
  metrics.csv  tensorboard/                      one epoch axis across both phases
  checkpoints/{head,finetune}_best.weights.h5    best by validation accuracy
  checkpoints/{head,finetune}.json               a phase's record; marks it finished
  backup/<phase>/                                BackupAndRestore state while a phase runs
  features/                                      phase 1's frozen-base features, verified on reuse
  checkpoints/finetune_robust.json               adversarial fine-tuning: PGD val accuracy per epoch
  model.keras  confusion_matrix.png  summary.json    summary.json marks the run finished
  report.json  reliability.png  misclassified.png    the trust report (tlkeras.evaluate)
  .lock                                          held by the one process writing the folder
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlkeras.config import Config, dump_yaml, is_folder, to_flat_dict
from tlkeras.errors import UserError
from tlkeras.files import atomic, write_atomic, write_json  # noqa: F401  (re-exported: run-folder writers)

SUMMARY = "summary.json"
METRICS = "metrics.csv"
DATASET = "dataset.json"
LOG = "train.log"
MODEL = "model.keras"  # the shipped weights, float32
REPORT = "report.json"  # the trust report (tlkeras.evaluate)
RECIPE = "recipe.yaml"


def default_run_dir(cfg: Config, kind: str = "") -> Path:
    """runs/<time>-<name>; without a name, <backbone>-<dataset> (a folder by its own name);
    a `kind` other than training goes before the name (runs/<time>-doctor-<name>)."""
    data = cfg.data.dataset
    dataset = Path(data).expanduser().resolve().name if is_folder(data) else data
    # A folder name that is not UTF-8 (surrogate-escaped bytes) would make a run folder no
    # console or tool shows right: those bytes become "_".
    dataset = "".join("_" if 0xDC80 <= ord(c) <= 0xDCFF or not c.isprintable() else c for c in dataset)
    name = cfg.name or f"{cfg.model.backbone}-{dataset}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{f'{kind}-' if kind else ''}{name}"


def find_unfinished(cfg: Config, root: Path = Path("runs")) -> Path | None:
    """train --resume: the most recently started run folder directly under `root` that has
    not finished (no summary.json) and whose config.yaml resolves to `cfg` (the same
    --config and --set give the same config); None when there is none. A folder whose
    config cannot be read is passed over."""
    from tlkeras.config import load_config

    candidates = []
    for folder in root.iterdir() if root.is_dir() else []:
        config_file = folder / "config.yaml"
        if not config_file.is_file() or (folder / SUMMARY).exists():
            continue
        try:
            same = to_flat_dict(load_config(config_file)) == to_flat_dict(cfg)
        except (UserError, ValueError, OSError):  # ConfigError is a UserError
            continue
        if same:
            candidates.append((config_file.stat().st_mtime, folder.name, folder))
    return max(candidates)[2] if candidates else None


def prepare(run_dir: Path, cfg: Config, argv: list[str]) -> bool:
    """Creates the folder or checks that it holds this same unfinished run; True if resuming."""
    if (run_dir / SUMMARY).exists():
        raise UserError(
            f"run folder '{run_dir}' holds a finished run ({SUMMARY} exists); "
            f"pass a new --run-dir, or delete the folder to train again"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise UserError(f"run folder '{run_dir}' is not writable ({e.strerror}); pass a writable --run-dir") from None
    config_file = run_dir / "config.yaml"
    if (run_dir / METRICS).exists():  # an epoch has finished: only the same config resumes
        _check_same_config(config_file, cfg)
        return True
    # Nothing trained yet (e.g. the last attempt stopped at a bad setting): start afresh.
    write_atomic(config_file, dump_yaml(cfg))
    write_json(run_dir / "environment.json", environment(argv))
    return False


LOCK = ".lock"


@contextmanager
def locked(folder: Path, what: str = "run folder") -> Iterator[None]:
    """Holds an exclusive advisory lock (fcntl.flock) on `folder`/.lock while the block runs.

    A second process asking for it is refused at once with a UserError naming the holder
    (pid and host, written into the file). The kernel drops the lock when its process
    dies, however it dies, so a lock left by a killed run is taken over with no clean-up.
    flock is per machine: on a network file system shared by several machines it may
    not exclude a process elsewhere, hence the host in the message.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = (folder / LOCK).open("a+")
    except OSError as e:
        raise UserError(f"{what} '{folder}' is not writable ({e.strerror}); pass a writable folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(
            f"{what} '{folder}' is in use by another tlkeras process ({holder}); wait for it "
            f"to finish or stop it (kill <pid>), or use another folder"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()  # releases the lock; the file stays (removing it would race a newcomer)


@contextmanager
def logging_to(run_dir: Path) -> Iterator[logging.Handler]:
    """The tlkeras logger also writes to `run_dir`/train.log (appended) inside the block."""
    handler = logging.FileHandler(run_dir / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.getLogger("tlkeras")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        handler.close()


def record_dataset(run_dir: Path, info) -> None:
    """Writes dataset.json; a resumed run must see the same classes, size and split counts."""
    path = run_dir / DATASET
    before = read_json(path)
    now = info.to_dict()
    keys = ("class_names", "storage_size", "num_train", "num_val", "num_test", "train_class_counts")
    changed = [k for k in keys if before is not None and before.get(k) != now[k]]
    if changed:  # images added or removed move the carves and the schedule: not a resume
        k = changed[0]
        raise UserError(
            f"run folder '{run_dir}' was trained on data with {k}={str(before.get(k))[:80]}, but "
            f"the data now gives {str(now[k])[:80]}; restore the data or pass a new --run-dir"
        )
    write_json(path, now)


def check_run(run_dir: Path, finished: bool = True) -> None:
    """The one check that `run_dir` is a tlkeras run folder (config.yaml) and, with
    `finished`, one whose training ended (summary.json, written last). Reads no file and
    imports no TensorFlow, so a CLI says what is wrong in milliseconds. Raises UserError
    naming the missing file and what to do."""
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "not found"
        raise UserError(f"run folder '{run_dir}' {what}; pass the --run-dir of a training run")
    unfinished = "the run has not finished: rerun its train command to resume it"
    needed = [("config.yaml", "not a tlkeras run folder")] + [(SUMMARY, unfinished)] * finished
    for name, why in needed:
        if not (run_dir / name).is_file():
            raise UserError(f"'{run_dir / name}' not found: {why}")


def load_run(run_dir: Path):
    """(Config, DatasetInfo, float32 Keras model with the run's shipped weights) of a
    finished run; UserError naming the file when one of them is damaged."""
    import keras

    from tlkeras.model import build_model  # also registers the preprocessing layers

    cfg = load_run_config(run_dir)
    info = load_dataset(run_dir)
    # Rebuilt in float32 whatever the training precision, as training's own export does.
    keras.mixed_precision.set_global_policy("float32")
    model = build_model(cfg.model, info, load_weights=False)
    path = run_dir / MODEL
    if not path.is_file():
        raise UserError(f"'{path}' not found: the run folder is incomplete; restore it, or train again")
    try:
        model.set_weights(keras.models.load_model(path).get_weights())
    except Exception as e:  # zipfile, h5py and Keras each raise their own kind for a damaged file
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(
            f"'{path}' cannot be loaded ({reason}): the file is damaged; restore it, "
            f"or train again with a new --run-dir"
        ) from None
    return cfg, info, model


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The settings a run trained with, every "auto" resolved: recipe.yaml, else config.yaml
    (a run from before recipes); `overrides` (KEY=VALUE) on top."""
    from tlkeras.config import load_config

    recipe = run_dir / RECIPE
    return load_config(recipe if recipe.exists() else run_dir / "config.yaml", overrides)


def load_dataset(run_dir: Path):
    """The DatasetInfo a run was trained on, read back from its dataset.json."""
    from tlkeras.data import DatasetInfo

    d = read_json(run_dir / DATASET)
    if d is None:
        raise UserError(f"'{run_dir / DATASET}' not found: --run-dir must name a training run")
    try:
        return DatasetInfo.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(
            f"'{run_dir / DATASET}' is damaged ({type(e).__name__}: {e}); restore it, "
            f"or train again with a new --run-dir"
        ) from None


STARTUP_FILES = {LOCK, "config.yaml", "environment.json", "train.log", DATASET, RECIPE}


def remove_if_unstarted(run_dir: Path) -> bool:
    """Deletes `run_dir` when it holds only what a run writes before it trains (the lock,
    config, environment, dataset description, log; empty folders), as when the data or
    weights were refused: no trace of a run that never started. Returns whether it did."""
    files = [f for f in run_dir.rglob("*") if not f.is_dir()]
    if not run_dir.is_dir() or any(f.parent != run_dir or f.name not in STARTUP_FILES for f in files):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def worker_copy(run_dir: Path) -> Path:
    """A non-chief worker's private folder, seeded with the chief's resume state.

    Reading the chief's backups (the run folder on a shared filesystem) makes every
    worker restore the same epoch and weights; writing only here keeps the run folder
    the chief's alone.
    """
    import shutil

    workdir = Path(tempfile.mkdtemp(prefix="tlkeras-worker-"))
    for name in ("backup", "checkpoints"):
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, workdir / name)
    if (run_dir / METRICS).is_file():
        shutil.copy(run_dir / METRICS, workdir / METRICS)
    return workdir


def _check_same_config(config_file: Path, cfg: Config) -> None:
    from tlkeras.config import load_config

    before = to_flat_dict(load_config(config_file))
    now = to_flat_dict(cfg)
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise UserError(
            f"run folder '{config_file.parent}' holds a run with {k}={before.get(k)!r}, "
            f"not {now[k]!r}; rerun with the same config to resume, or pass a new --run-dir"
        )


def environment(argv: list[str]) -> dict[str, Any]:
    import keras
    import tensorflow as tf
    import tensorflow_datasets as tfds

    return {
        "command": [sys.executable, "-m", "tlkeras.train", *argv],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_datasets": tfds.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def read_json(path: Path) -> Any:
    """The JSON in `path`, None when there is no such file; UserError when it is damaged."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(
            f"'{path}' is not valid JSON ({e}): the file is damaged; restore it, or train again with a new --run-dir"
        ) from None


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def truncate_metrics(run_dir: Path, first_epoch_to_drop: int) -> None:
    """Drops rows of epochs that will be trained again, so each epoch appears once."""
    path = run_dir / METRICS
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and int(float(r[0])) < first_epoch_to_drop]
    if len(keep) == len(body):
        return
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows([header, *keep])
