"""Resuming inside an epoch, and stopping cleanly on SIGTERM or Ctrl-C.

    with GracefulStop() as stop:
        backup = StepBackup(run_dir / "backup" / "finetune", steps, every_s=60, stop=stop)
        done = backup.restore(model)  # optimizer steps this phase has taken (0: fresh)
        epoch, skip = divmod(done, steps)  # continue at that epoch, after `skip` batches
        model.fit(..., callbacks=[..., backup])

Keras's BackupAndRestore(save_freq=N) writes the weights and the optimizer state (its
iteration count, hence the learning-rate schedule's step, and the Adam moments) every N
batches, but on resume it only restores the epoch number: the interrupted epoch starts
again from its first batch, in a new data order, and the schedule runs past its end.
StepBackup fills that gap and nothing more:

- the position is the optimizer's iteration count, stored in the same file as the
  weights, so the caller resumes the data at (epoch, batch) with `data.seeded_epochs`;
- a backup is written every `every_s` seconds at a step boundary (time, not steps: it
  bounds the work a kill loses whatever the step time), and at every epoch end;
- writes are atomic (a temporary file, then os.replace): a kill or a full disk mid-write
  leaves the previous backup whole, so no second copy is needed;
- the dropout layers' random state is saved with it, so the resumed steps draw the
  masks the uninterrupted run draws;
- the running train loss/accuracy of the interrupted epoch are saved with it and added
  back, so metrics.csv's row for that epoch averages the whole epoch (one replica only:
  per-replica metric state cannot be assigned from outside a step).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np

from tlkeras.errors import UserError
from tlkeras.rundir import atomic

log = logging.getLogger("tlkeras")
# HDF5 attributes of the backup beside what save_weights writes: the epoch's metric state
# so far, and the dropout layers' random state (Keras saves no seed generator state).
METRICS_ATTR, SEEDS_ATTR = "tlkeras_metrics", "tlkeras_seeds"


class Preempted(UserError):
    """Stopped by a signal after saving what could be saved; exit 128 + signal number."""

    label = "stopped"
    signal_name = "a signal"

    def nothing_saved(self) -> Preempted:
        """This stop as told once the run folder it would name is gone (train removes a
        folder it created when nothing had started): no folder to name, nothing to resume."""
        e = Preempted(
            f"{self.signal_name}: stopped before training started; nothing was saved and the new "
            f"run folder was removed; rerun the same command to start again"
        )
        e.exit_code = self.exit_code
        return e


class GracefulStop:
    """SIGTERM / SIGINT handlers for the duration of a `with` block (main thread only).

    The first signal is noted; while training steps run (`deferred`) the StepBackup
    callback writes a backup at the next step boundary and raises Preempted; anywhere
    else (feature computation, validation, evaluation, export) Preempted is raised at
    once, since what is done there is either saved already or quick to redo. A second
    signal exits at once (status 128 + signal number).
    """

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: stopping at the next step boundary", signal.Signals(signum).name)
        if not self.deferred:
            raise self.error("outside the training steps; what is saved stands")

    def error(self, where: str) -> Preempted:
        name = signal.Signals(self.signum).name
        folder = f" with --run-dir '{self.run_dir}' (or with --resume)" if self.run_dir else " with --resume"
        e = Preempted(f"{name}: training stopped {where}; rerun the same command{folder} to resume")
        e.exit_code, e.signal_name = 128 + self.signum, name
        return e


class StepBackup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, resumable mid-epoch (see the module docstring).

    `steps`: training steps per epoch; `every_s`: seconds between mid-epoch backups
    (0: epoch ends only); `stop`: the GracefulStop to honour at step boundaries.
    Put it last among the callbacks: an epoch counts as done only after its metrics row
    and best checkpoint are written.
    """

    def __init__(self, backup_dir: Path, steps: int, every_s: float, stop: GracefulStop | None = None):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.path = Path(self._weights_path)
        self.steps = steps
        self.every_s = every_s
        self.stop = stop
        self._metric_state: list | None = None
        self._epoch = 0
        self._last_save = time.monotonic()

    def restore(self, model: keras.Model) -> int:
        """Loads the backup (weights, optimizer state, dropout seeds) into `model`, which
        must be compiled; returns the optimizer's iteration count, 0 without a backup."""
        import h5py

        self.set_model(model)
        if not self.path.exists():
            return 0
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.path)
        with h5py.File(self.path, "r") as f:
            metrics, seeds = f.attrs.get(METRICS_ATTR), f.attrs.get(SEEDS_ATTR)
        if seeds is not None:
            for v, value in zip(_seed_states(model), json.loads(seeds), strict=True):
                v.assign(np.asarray(value, dtype=v.dtype))
        done = int(model.optimizer.iterations.numpy())
        if metrics is not None and done % self.steps:
            self._metric_state = json.loads(metrics)
        return done

    def position(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    # -- Keras hooks

    def on_train_begin(self, logs=None):
        # restore() ran before the data pipeline was built: it decides where the data starts.
        self._last_save = time.monotonic()
        if self.stop:
            self.stop.deferred = True

    def on_train_end(self, logs=None):
        if self.stop:
            self.stop.deferred = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _add_back_metrics(self):
        # After the resumed epoch's first step: Keras builds its compile metrics in that
        # step. Its Mean metrics keep (total, count) sums, so adding is restoring.
        variables = [v for m in self.model.metrics for v in m.variables]
        if self.model.distribute_strategy.num_replicas_in_sync == 1 and len(variables) == len(self._metric_state):
            for v, value in zip(variables, self._metric_state):
                v.assign_add(np.asarray(value, dtype=v.dtype))
        self._metric_state = None

    def on_test_begin(self, logs=None):
        if self.stop:  # validation can take minutes: a signal stops it at once
            self.stop.deferred = False
            if self.stop.requested:
                raise self.stop.error("before validation; the last backup stands")

    def on_test_end(self, logs=None):
        if self.stop:
            self.stop.deferred = True

    def on_train_batch_end(self, batch, logs=None):
        if self._metric_state is not None:
            self._add_back_metrics()
        stopping = self.stop is not None and self.stop.requested
        due = self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s
        if not (stopping or due):
            return
        done = self.position()
        # After an epoch's last step the epoch-end backup follows its metrics row; one
        # written here would claim the epoch done before its row exists.
        if done % self.steps:
            self._save_model()
            where = f"after step {done % self.steps} of {self.steps} in epoch {self._epoch + 1} (backup saved)"
        else:
            where = "at the end of an epoch's steps; the last backup stands"
        if stopping:
            raise self.stop.error(where)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)  # saves
        if self.stop is not None and self.stop.requested:
            raise self.stop.error(f"after epoch {epoch + 1} (backup saved)")

    def _save_model(self):
        """Atomic: the weights and optimizer state go to a temporary file (Keras wants the
        .weights.h5 ending), the epoch's metric state into its attributes, then one rename."""
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(self.path, "the resume backup", state_bytes(self.model)) as tmp:
            self.model.save_weights(str(tmp), overwrite=True)
            with h5py.File(tmp, "a") as f:
                state = [np.asarray(v.numpy()).tolist() for m in self.model.metrics for v in m.variables]
                f.attrs[METRICS_ATTR] = json.dumps(state)
                f.attrs[SEEDS_ATTR] = json.dumps([np.asarray(v.numpy()).tolist() for v in _seed_states(self.model)])
        self._last_save = time.monotonic()


def _seed_states(model: keras.Model) -> list:
    return [v for v in model.variables if "seed_generator_state" in v.path]


def state_bytes(model: keras.Model) -> int:
    """Roughly what a backup takes on disk: the weights and the optimizer's variables."""
    variables = [*model.weights, *(model.optimizer.variables if getattr(model, "optimizer", None) else [])]
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
