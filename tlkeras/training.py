"""Two-phase transfer learning under a tf.distribute strategy.

    summary = train_and_evaluate(load_config("configs/smoke.yaml"), Path("runs/smoke"))

Phase 1 trains the new head over the frozen base (VGG16 or MobileNetV2) on features
computed once; phase 2 unfreezes the base (all of it or from a named block), recompiles
at a low learning rate with warm-up and cosine decay, and continues the epoch count. Each
phase keeps its best weights by validation accuracy (a tie goes to the later epoch); the
phase with the higher validation accuracy is shipped (the head's if fine-tuning did
worse) and evaluated once on the test split, followed by the quick trust report
(tlkeras.evaluate), whose temperature the exports fold in. With finetune.adversarial,
phase 2 trains on FGSM-RS examples (tlkeras.robustness) and is picked by PGD accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # op determinism: no public off switch or query

from tlkeras import rundir
from tlkeras.config import Config
from tlkeras.console import Progress
from tlkeras.data import DatasetInfo, Splits, feature_dataset, feature_epochs, make_datasets, read_errors
from tlkeras.doctor import quick_check
from tlkeras.errors import UserError, writing
from tlkeras.evaluate import (
    dataset_logits,
    dead_class_warning,
    headline_warnings,
    imbalance_warning,
    logits_function,
    save_confusion_png,
    test_metrics,
    to_arrays,
    trust_report,
    val_temperature,
)
from tlkeras.export import describe as describe_export
from tlkeras.export import export_model
from tlkeras.features import compute_features
from tlkeras.litert import int8_data
from tlkeras.model import build_model, set_finetune_trainable, split_at_features
from tlkeras.policies import (
    balanced_class_weights,
    choose_precision,
    choose_strategy,
    final_phase,
    is_chief,
    per_replica_batch,
    read_cpu_flags,
    steps_per_epoch,
    warmup_steps,
)
from tlkeras.recipe import DeadlineStop, Recipe, survey
from tlkeras.resume import GracefulStop, StepBackup, state_bytes
from tlkeras.robustness import FGSM_RS_STEP_FACTOR, PGD_STEPS, AdversarialFinetune, RobustAccuracyCheck

log = logging.getLogger("tlkeras")
PHASES = ("head", "finetune")


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TF's strategy, with a `reduce` that Keras 3 `fit` can use (keras-team/keras#20585).

    Keras reduces a (uint8 images, labels) tuple to build the model, and scalar losses
    with axis=0 after each step; TF's collective strategy refuses tuples, uint8 and
    axis=0 on scalars. Here each element is reduced on its own, uint8 via int32, and a
    scalar across replicas only.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(v):
            local = self.experimental_local_results(v)[0]
            ax = axis if local.shape.rank else None
            if local.dtype != tf.uint8:
                return parent.reduce(reduce_op, v, ax)
            wide = self.run(tf.cast, args=(v, tf.int32))
            return tf.cast(parent.reduce(reduce_op, wide, ax), tf.uint8)

        return tf.nest.map_structure(one, value)


def make_strategy(requested: str) -> tf.distribute.Strategy:
    gpus = tf.config.list_physical_devices("GPU")
    name = choose_strategy(requested, "TF_CONFIG" in os.environ, len(gpus))
    if name == "multi_worker":
        return MultiWorkerMirroredStrategy()
    if name == "mirrored":
        # Without GPUs, mirror across the logical CPU devices (how tests get two replicas).
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def compile_for_phase(model: keras.Model, cfg: Config, phase: str, steps: int) -> None:
    if phase == "head":
        learning_rate: Any = cfg.head.learning_rate
    else:
        total = cfg.finetune.epochs * steps
        warmup = warmup_steps(cfg.finetune.warmup_epochs, steps, total)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else cfg.finetune.learning_rate,
            decay_steps=total - warmup,
            warmup_target=cfg.finetune.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=cfg.runtime.jit_compile,
        steps_per_execution=cfg.runtime.steps_per_execution,
    )


@contextlib.contextmanager
def peer_watchdog(timeout_s: float, peers: list[str]):
    """Ends the process (status 1) if the block, joining the other workers, has not finished
    after `timeout_s`: TensorFlow waits for absent peers forever, and while it does no
    Python thread runs (a threading.Timer never fired: the GIL is held) nor does a signal
    handler. faulthandler's timer is a C thread that needs no GIL; the line saying what
    will happen is logged before the wait."""
    import faulthandler

    log.info(
        "waiting for the other workers (%s); if they do not all answer within %.0f s "
        "(runtime.peer_timeout_s) this worker exits with status 1",
        ", ".join(peers),
        timeout_s,
    )
    with open(os.devnull, "w") as devnull:  # the timer's thread dump is noise here
        faulthandler.dump_traceback_later(timeout_s, exit=True, file=devnull)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


def _drop_unreadable_backup(backup_dir: Path, phase: str) -> None:
    """A backup is replaced atomically, but one damaged on disk (or cut by a kill under an
    older tlkeras, which wrote it in place) would fail every rerun: restart the phase
    instead."""
    import h5py

    latest = backup_dir / "latest.weights.h5"
    if not latest.exists():  # StepBackup keeps no .bkp copy: this file is the only backup
        return
    try:
        with h5py.File(latest, "r"):
            return
    except OSError:
        log.warning(
            "%s: the backup %s is unreadable (damaged, or cut by an older tlkeras); "
            "the phase restarts from its first epoch",
            phase,
            latest,
        )
        shutil.rmtree(backup_dir)


def _loads(path: Path, cfg: Config, info: DatasetInfo) -> bool:
    try:
        build_model(cfg.model, info, load_weights=False).load_weights(path)
        return True
    except Exception:  # h5py and Keras raise several kinds for a truncated file
        return False


def _drop_if_not_finite(model: keras.Model, path: Path) -> bool:
    """A checkpoint saved from a diverged model is deleted rather than kept as 'best'."""
    if not path.exists():
        return False
    model.load_weights(path)
    if all(np.isfinite(w).all() for w in model.get_weights()):
        return True
    path.unlink()
    return False


class WholeModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Phase 1 fits a head-only view; its checkpoints still hold the whole model.

    An epoch that only ties the best validation accuracy also replaces it: with a small
    validation split (24 photos) accuracy ties are common, and the later epoch has
    trained longer (the first of them was kept before: an undertrained head).
    """

    def __init__(self, whole: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole = whole

    def set_model(self, model):
        super().set_model(self.whole)

    def _get_file_path(self, epoch, batch, logs):
        return str(self._tmp)

    def _save_model(self, epoch, batch, logs):
        # Written aside, then renamed: a kill or a full disk mid-write keeps the previous best.
        with rundir.atomic(Path(self.filepath), "the best checkpoint", state_bytes(self.model)) as self._tmp:
            super()._save_model(epoch, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is not None and self.best is not None and current == self.best:
            self.best = -math.inf  # mode "max": the tie now counts as an improvement
        super().on_epoch_end(epoch, logs)


# Data settings that never change the frozen features (where and whether images are kept does not).
NOT_IN_FEATURES = ("batch_size", "shuffle_buffer", "cache", "prepared_dir")


def features_fingerprint(cfg: Config, info: DatasetInfo) -> str:
    """What the frozen features depend on: the base and its weights, the data and its
    splits, the seed (carves; random weights) and the precision. Anything else may change."""
    weights = cfg.model.weights
    if weights not in (None, "imagenet"):  # a file: its identity, not its path alone
        stat = Path(weights).expanduser().stat()
        weights = f"{Path(weights).expanduser().resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in NOT_IN_FEATURES}
    key = {
        "model": {**dataclasses.asdict(cfg.model), "weights": weights},
        "data": data,
        "seed": cfg.seed,
        "dataset": info.to_dict(),
        "precision": keras.mixed_precision.global_policy().name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_or_compute_features(folder: Path, part: str, fingerprint: str, compute) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one part (train, mirrored train, val) from `folder` when
    its manifest matches `fingerprint` and the file's checksum, else `compute()`d and
    saved atomically (the .npz first, then the manifest that vouches for it)."""
    data, manifest = folder / f"{part}.npz", folder / f"{part}.json"
    meta = rundir.read_json(manifest) if manifest.exists() else None
    if meta and meta.get("fingerprint") == fingerprint and data.exists() and _sha256(data) == meta["sha256"]:
        with np.load(data) as f:
            features, labels = f["features"], f["labels"]
        if list(features.shape) == meta["shape"]:
            return features, labels
    if meta:
        log.warning("head: cached %s features in %s do not match this run or are damaged; recomputing", part, folder)
    features, labels = compute()
    folder.mkdir(exist_ok=True)
    with rundir.atomic(data, "the features cache", features.nbytes + labels.nbytes) as tmp:
        np.savez(tmp, features=features, labels=labels)
    rundir.write_json(manifest, {"fingerprint": fingerprint, "sha256": _sha256(data), "shape": list(features.shape)})
    return features, labels


def cached_feature_data(
    extractor: keras.Model, cfg: Config, splits: Splits, run_dir: Path
) -> tuple[Any, tf.data.Dataset, float, float | None]:
    """Phase 1's train epochs (`data.feature_epochs`) and val set as features of the frozen
    base, computed once; each part is kept in run_dir/features/ and reused by a resumed run.
    Also returns the seconds taken and the images/s (None when every part was reused)."""
    start = time.perf_counter()
    folder, key = run_dir / "features", features_fingerprint(cfg, splits.info)
    mirror = cfg.data.augment and cfg.head.mirrored_features
    computed = []

    def part(name, images, total, flip=False):
        def compute():
            computed.append(name)
            progress = Progress(f"head: computing the {' '.join(reversed(name.split('_')))} features", total)
            return compute_features(extractor, images, flip, progress)

        return load_or_compute_features(folder, name, key, compute)

    features, labels = part("train", splits.train_plain, splits.num_train)
    flipped = part("train_mirrored", splits.train_plain, splits.num_train, flip=True)[0] if mirror else None
    val_features, val_labels = part("val", splits.val, splits.num_val)
    seconds = time.perf_counter() - start
    images = len(labels) * (2 if mirror else 1) + len(val_labels)
    what = "train, mirrored train, val" if mirror else "train, val"
    if computed:
        log.info(
            "head: features of %d images (%s) in %.0f s, %.0f images/s; cached for every epoch",
            images,
            what,
            seconds,
            images / seconds,
        )
    else:
        log.info("head: features of %d images (%s) reused from %s", images, what, folder)
    train = feature_epochs(features, labels, cfg.data.batch_size, cfg.seed, flipped)
    val = feature_dataset(val_features, val_labels, cfg.data.batch_size)
    return train, val, seconds, (images / seconds if computed else None)


def fit_phase(
    phase: str,
    cfg: Config,
    strategy: tf.distribute.Strategy,
    splits: Splits,
    run_dir: Path,
    first_epoch: int,
    epochs: int,
    init_weights: Path | None,
    stop: GracefulStop | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Trains one phase (resuming its backup if any, mid-epoch) and returns its record;
    with a time budget (`recipe`), stops at the first step boundary after its deadline."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    best_path = ckpt_dir / f"{phase}_best.weights.h5"
    backup_dir = run_dir / "backup" / phase
    steps = steps_per_epoch(splits.num_train, cfg.data.batch_size)

    with strategy.scope():
        # Seeded here: a resumed phase 1 with random weights (model.weights=null) rebuilds
        # the very base its backed-up head was trained on.
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(cfg.model, splits.info, load_weights=init_weights is None)
        if phase == "finetune":
            set_finetune_trainable(model, cfg.finetune.unfreeze)
        if init_weights is not None:
            model.load_weights(init_weights)
        # The base is frozen in phase 1: its features are computed once, not every epoch.
        extractor, trained = split_at_features(model) if phase == "head" else (None, model)
        adversarial = phase == "finetune" and cfg.finetune.adversarial
        if adversarial:  # same weights, FGSM-RS batches (robustness.AdversarialFinetune)
            step = cfg.finetune.step_size or FGSM_RS_STEP_FACTOR * cfg.finetune.epsilon
            trained = AdversarialFinetune(model, cfg.finetune.epsilon, step)
        compile_for_phase(trained, cfg, phase, steps)
        _drop_unreadable_backup(backup_dir, phase)
        backup = StepBackup(backup_dir, steps, cfg.runtime.backup_minutes * 60, stop)
        # The optimizer's step count says where the backup was taken: epoch and batch.
        done_epochs, skip = divmod(backup.restore(trained), steps)

    resume_at = first_epoch + done_epochs
    rundir.truncate_metrics(run_dir, resume_at)
    done = [r for r in rundir.read_metrics(run_dir) if r["epoch"] >= first_epoch]
    # The criterion that picks the phase's best epoch: robust accuracy when adversarial.
    robust_path = ckpt_dir / f"{phase}_robust.json"
    robust = {int(k): v for k, v in (rundir.read_json(robust_path) or {}).items() if int(k) < resume_at}
    monitor = RobustAccuracyCheck.KEY if adversarial else "val_accuracy"
    best_so_far = max(robust.values() if adversarial else (r["val_accuracy"] for r in done), default=None)
    if best_path.exists() and not _loads(best_path, cfg, splits.info):
        # Killed while ModelCheckpoint wrote it: never mistake it for a checkpoint.
        log.warning("%s: %s is unreadable (interrupted write); discarding it", phase, best_path)
        best_path.unlink()
        best_so_far = None
    if resume_at > first_epoch or skip:
        log.info(
            "%s: resuming at epoch %d%s (best %s so far %s)",
            phase,
            resume_at + 1,
            f", step {skip + 1} of {steps}" if skip else "",
            monitor,
            best_so_far,
        )
    trainable = sum(int(np.prod(v.shape)) for v in trained.trainable_weights)
    log.info(
        "%s: epochs %d-%d, %d trainable parameters, %d steps/epoch, %d replica(s)",
        phase,
        first_epoch + 1,
        first_epoch + epochs,
        trainable,
        steps,
        strategy.num_replicas_in_sync,
    )

    budget = []
    if recipe is not None and recipe.end is not None:
        planned = recipe.finetune_ips.get(cfg.finetune.unfreeze) if phase == "finetune" else None
        budget = [DeadlineStop(recipe, cfg.data.batch_size * cfg.runtime.steps_per_execution, planned)]
    guard = []
    if adversarial:  # after CSVLogger: metrics.csv keeps the same columns in both phases
        n = cfg.finetune.robust_check_images
        images, labels = to_arrays(splits.val, n)
        guard = [
            RobustAccuracyCheck(
                model,
                images,
                labels,
                cfg.finetune.epsilon,
                robust,
                lambda h: rundir.write_json(robust_path, h),
                seed=cfg.seed,
            )
        ]
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(run_dir / rundir.METRICS), append=True),
        *guard,
        WholeModelCheckpoint(
            model,
            str(best_path),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
        *budget,
        # Last: an epoch counts as done only after its metrics row and best checkpoint
        # are written. Kept after fit until the phase record exists, so no kill loses the phase.
        backup,
    ]
    start = time.perf_counter()
    with read_errors(cfg.data):
        train_epochs, val, features_s, features_ips = (
            cached_feature_data(extractor, cfg, splits, run_dir)
            if extractor
            else (splits.epochs, splits.val, None, None)
        )
    weights = balanced_class_weights(splits.info.train_class_counts) if cfg.data.class_weight else None
    fit = dict(validation_data=val, class_weight=weights, callbacks=callbacks)
    losses, last_epoch = _fit_epochs(
        trained, train_epochs, resume_at, first_epoch + epochs, skip, steps, cfg, run_dir, fit
    )
    wall = time.perf_counter() - start
    if any(not math.isfinite(v) for v in losses):
        kept = _drop_if_not_finite(model, best_path)
        where = f"the last good weights are in '{best_path}'" if kept else "no good weights were saved in this phase"
        lr = getattr(cfg, phase).learning_rate
        raise UserError(
            f"{phase}: the loss became NaN/inf in epoch {last_epoch + 1}, so "
            f"training stopped; {where}. Lower {phase}.learning_rate (now {lr:g}) and "
            f"train again with a new --run-dir"
        )
    if not best_path.exists():  # no epoch ran in this call and none was saved before
        model.save_weights(best_path)

    rows = [r for r in rundir.read_metrics(run_dir) if r["epoch"] >= first_epoch]
    if adversarial:
        for r in rows:
            r[monitor] = robust.get(int(r["epoch"]), -1.0)
    best = max(reversed(rows), key=lambda r: r[monitor])  # the last of tied epochs
    epochs_run = len(losses)
    record = {
        "epochs": epochs,
        "first_epoch": first_epoch + 1,
        "best_epoch": int(best["epoch"]) + 1,
        "val_accuracy": best["val_accuracy"],
        "best_epoch_by": monitor,
        "train_accuracy": rows[-1]["accuracy"],
        "trainable_parameters": trainable,
        "wall_time_s": round(wall, 1),
        # Of this invocation only: a resumed phase reports the epochs it ran itself.
        "epochs_run": epochs_run,
        "images_per_second": round(epochs_run * splits.num_train / wall, 1) if epochs_run else None,
        "best_weights": str(best_path.relative_to(run_dir)),
    }
    if budget and budget[0].stopped:
        record["stopped_at_budget"] = True  # runtime.time_budget_minutes: the best epoch so far is kept
    if features_s is not None:  # phase 1 only: part of its wall time
        record["feature_extraction_s"] = round(features_s, 1)
        record["feature_images_per_s"] = features_ips and round(features_ips, 1)
    if adversarial:
        record["adversarial"] = {
            "method": "FGSM with random start (Wong et al. 2020)",
            "epsilon": cfg.finetune.epsilon,
            "step_size": step,
            "val_robust_accuracy": best[monitor],
            "robust_check": f"PGD-{PGD_STEPS} at {cfg.finetune.epsilon:g}/255 on {len(guard[0].labels)} val images",
            "val_robust_accuracy_per_epoch": {str(k + 1): v for k, v in sorted(robust.items())},
        }
    rundir.write_json(ckpt_dir / f"{phase}.json", record)
    shutil.rmtree(backup_dir, ignore_errors=True)
    shutil.rmtree(run_dir / "features", ignore_errors=True)  # phase 1 is never redone now
    return record


def _fit_epochs(trained, train_epochs, begin: int, end: int, skip: int, steps: int, cfg, run_dir: Path, fit: dict):
    """`fit` over epochs begin..end-1 resuming `skip` steps into the first; (each epoch's
    loss, the last epoch run). Stops after an epoch whose loss is not finite
    (TerminateOnNaN). fit runs the same number of steps every epoch, so the rest of an
    interrupted epoch is a fit of its own."""
    segments = [(begin, begin + 1, skip), (begin + 1, end, 0)] if skip else [(begin, end, 0)]
    losses: list[float] = []
    last_epoch = begin
    for first, until, skipped in segments:
        if first >= until or any(not math.isfinite(v) for v in losses):
            continue
        with read_errors(cfg.data), writing(run_dir, "checkpoints, backups and metrics"):
            history = trained.fit(
                train_epochs(first, until, skipped),
                steps_per_epoch=steps - skipped,
                initial_epoch=first,
                epochs=until,
                shuffle=False,
                verbose=1 if sys.stdout.isatty() else 2,
                **fit,
            )
        losses += history.history.get("loss", [])
        last_epoch = history.epoch[-1] if history.epoch else last_epoch
    return losses, last_epoch


def train_and_evaluate(cfg: Config, run_dir: Path, argv: list[str] = (), start: float | None = None) -> dict[str, Any]:
    """Both phases, the test evaluation, exports and summary.json in `run_dir`; `start`
    (time.perf_counter) is when the command began, from which a time budget counts.

    Under MultiWorkerMirroredStrategy every worker trains, but only the chief writes
    `run_dir`; the others work in a private temporary copy of its resume state (so a
    restarted cluster resumes at the same epoch everywhere) and delete it at the end.
    """
    start = time.perf_counter() if start is None else start
    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"] if "TF_CONFIG" in os.environ else {}
    peers = [address for addresses in cluster.values() for address in addresses]
    with peer_watchdog(cfg.runtime.peer_timeout_s, peers) if peers else contextlib.nullcontext():
        strategy = make_strategy(cfg.runtime.strategy)  # first: multi-worker needs a fresh runtime
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):  # every worker is there
            strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    resolver = getattr(strategy, "cluster_resolver", None)
    chief = resolver is None or is_chief(
        resolver.task_type, resolver.task_id, "chief" in resolver.cluster_spec().as_dict()
    )
    with contextlib.ExitStack() as stack:
        if chief:  # one writer per run folder; other workers write a private copy
            stack.enter_context(rundir.locked(run_dir))
            resuming = rundir.prepare(run_dir, cfg, list(argv))
            workdir = run_dir
        else:
            workdir = rundir.worker_copy(run_dir)
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            resuming = (workdir / "backup").exists() or (workdir / "checkpoints").exists()
        handler = stack.enter_context(rundir.logging_to(workdir))
        policy = keras.mixed_precision.global_policy()
        determinism = tf_config.is_op_determinism_enabled()
        try:
            with GracefulStop(run_dir) as stop:
                return _train(cfg, strategy, workdir, chief, resuming, start, stop)
        except UserError as e:  # the console gets it from the CLI; the log must say why it stopped
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, f"{e.label}: %s", (e,), None))
            raise
        finally:  # leave no global state behind
            keras.mixed_precision.set_global_policy(policy)
            if not determinism:
                tf_config.disable_op_determinism()


def image_sizes(storage: int, model: int) -> str:
    """'stored at 32x32, resized to 64x64 in the model' (or 'stored and read at 224x224')."""
    if storage == model:
        return f"stored and read at {storage}x{storage}"
    return f"stored at {storage}x{storage}, resized to {model}x{model} in the model"


def weights_fingerprint(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def _train(
    cfg: Config,
    strategy: tf.distribute.Strategy,
    run_dir: Path,
    chief: bool,
    resuming: bool,
    start: float,
    stop: GracefulStop | None = None,
) -> dict[str, Any]:
    log.info("%s run in %s", "resuming" if resuming else "starting", run_dir)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.runtime.deterministic:  # the data order is the seed's already; this fixes the float sums
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    precision = choose_precision(cfg.runtime.mixed_precision, len(gpus), read_cpu_flags())
    keras.mixed_precision.set_global_policy(precision)
    replicas = strategy.num_replicas_in_sync
    # The "auto" settings, from the data, this machine and the time budget (tlkeras.recipe).
    recipe = Recipe(cfg, replicas, accelerator=bool(gpus))
    cfg = recipe.before_data(survey(cfg.data), start, run_dir if resuming else None)
    recipe.log("before training")
    if chief:
        recipe.write(run_dir)
    per_replica = per_replica_batch(cfg.data.batch_size, replicas)
    log.info(
        "strategy %s, %d replica(s) x %d images, precision %s",
        type(strategy).__name__,
        replicas,
        per_replica,
        precision,
    )

    splits = make_datasets(cfg.data, cfg.seed, cfg.model.resolution)
    info = splits.info
    recipe.observed(info.num_train, info.num_val, info.num_test)
    log.info(
        "data: %s (%s), %d classes, %s; %d train, %d val, %d test images",
        info.name,
        info.source,
        info.num_classes,
        image_sizes(info.storage_size, cfg.model.resolution),
        info.num_train,
        info.num_val,
        info.num_test,
    )
    log.info("data: splits %s", "; ".join(f"{k}: {v}" for k, v in info.splits.items()))
    if cfg.data.batch_size > info.num_train // 4:
        log.warning(
            "data.batch_size=%d leaves %d step(s) per epoch for %d training images; "
            "a smaller batch (e.g. %d) gives more updates per epoch",
            cfg.data.batch_size,
            steps_per_epoch(info.num_train, cfg.data.batch_size),
            info.num_train,
            max(1, info.num_train // 8),
        )
    log.info(
        "data: train images per class: %s",
        ", ".join(f"{c} {n}" for c, n in zip(info.class_names, info.train_class_counts)),
    )
    imbalance = imbalance_warning(info.class_names, info.train_class_counts, cfg.data.class_weight)
    if imbalance:
        log.warning("data: %s", imbalance)
    if chief:
        rundir.record_dataset(run_dir, info)
    if cfg.data.doctor:  # exact duplicates and leaks between splits, by file hash: seconds
        quick_check(splits)

    records: dict[str, Any] = {}
    weights: Path | None = None
    epoch = 0
    for phase in PHASES:
        if phase == "finetune" and "head" in records:  # depth and rate from the frozen features' val accuracy
            head = records["head"]
            cfg = recipe.after_head(
                head["val_accuracy"], None, head.get("feature_images_per_s"), head.get("feature_extraction_s")
            )
            recipe.log("after phase 1")
            if chief:
                recipe.write(run_dir)
        epochs = getattr(cfg, phase).epochs
        if epochs == 0:  # finetune.epochs: 0 skips phase 2
            continue
        record = rundir.read_json(run_dir / "checkpoints" / f"{phase}.json")
        if record:
            log.info("%s: finished earlier (val_accuracy %.4f); not redone", phase, record["val_accuracy"])
        else:
            record = fit_phase(phase, cfg, strategy, splits, run_dir, epoch, epochs, weights, stop, recipe)
        records[phase] = record
        weights = run_dir / record["best_weights"]
        epoch += epochs
    setup = {
        "resumed": resuming,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "per_replica_batch": per_replica,
        "precision": precision,
    }
    return finish_run(cfg, run_dir, splits, records, chief, start, setup, recipe)


def finish_run(
    cfg: Config,
    run_dir: Path,
    splits: Splits,
    records: dict[str, Any],
    chief: bool,
    start: float,
    setup: dict[str, Any],
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """After the phases (`records`: each phase's record): the shipped weights, the best of
    the phase with the higher val accuracy, tested once on the test split and saved as
    model.keras; the quick trust report and its temperature; the exports; summary.json
    last (it marks the run finished; `setup` joins it). Workers other than the chief only
    fingerprint the weights."""
    info = splits.info
    final = final_phase({phase: r["val_accuracy"] for phase, r in records.items()})
    if "adversarial" in records.get("finetune", {}):
        final = "finetune"  # chosen for robustness: the head's clean accuracy is no rival
    if final != list(records)[-1]:
        log.info(
            "final weights: the %s phase's (val_accuracy %.4f); fine-tuning did not beat it",
            final,
            records[final]["val_accuracy"],
        )
    # The shipped model computes in float32 whatever the training precision: it runs
    # anywhere (onnxruntime has no bf16 convolutions on CPU) and its outputs are stable.
    # Built outside the strategy: evaluation and export are local, not collective.
    keras.mixed_precision.set_global_policy("float32")
    model = build_model(cfg.model, info, load_weights=False)
    model.load_weights(run_dir / records[final]["best_weights"])
    fingerprint = weights_fingerprint(model)
    log.info("final weights sha256 %s", fingerprint)
    if not chief:
        return {"worker": True, "weights_sha256": fingerprint, "phases": records}

    # The test split's logits, once: the accuracy here and the trust report's clean pass.
    logits_fn = logits_function(model)
    with read_errors(cfg.data):  # the images are kept for the report, else only 64 for the export
        progress = Progress("test pass", info.num_test)
        test = dataset_logits(logits_fn, splits.test, None if cfg.evaluate.enabled else 64, progress)
    results = test_metrics(test[2].argmax(1), test[1], info.class_names)
    recalls = list(results["per_class_test_accuracy"].values())
    dead = dead_class_warning(info.class_names, recalls, info.train_class_counts, cfg.data.class_weight)
    if dead:
        log.warning("test: %s", dead)  # the train imbalance was said at the start
    warnings = headline_warnings(info.class_names, recalls, info.train_class_counts, cfg.data.class_weight)
    save_confusion_png(results["confusion_matrix"], info.class_names, info.name, run_dir / "confusion_matrix.png")
    with rundir.atomic(run_dir / rundir.MODEL, "the model", 2 * sum(w.nbytes for w in model.get_weights())) as tmp:
        model.save(tmp)

    # The trust report (quick) fits the temperature; without it, only the temperature is fitted.
    # Under a time budget the report goes first when it no longer fits; the exports never do.
    skip_report = cfg.evaluate.enabled and recipe is not None and recipe.skips_report()
    if skip_report:
        log.warning(
            "time budget: trust report skipped to end in time; python -m tlkeras.evaluate --run-dir %s runs it",
            run_dir,
        )
    report = (
        trust_report(model, cfg, splits, run_dir, quick=True, test=test)
        if cfg.evaluate.enabled and not skip_report
        else None
    )
    temperature = None
    if report:
        temperature = report["calibration"]["temperature"]
    elif cfg.evaluate.fold_temperature:
        temperature = round(val_temperature(logits_fn, splits.val, cfg.seed)[0], 4)

    exports = []
    if cfg.export.enabled:
        first_test = test[0][:64]
        base = Path(cfg.export.base) if cfg.export.base else run_dir / "export"
        folded = temperature if cfg.evaluate.fold_temperature else 1.0
        with read_errors(cfg.data):
            int8 = int8_data(splits, cfg)  # training images to calibrate on, test images for the gate
        with (
            rundir.locked(base, "export base"),
            writing(base, "the export", 3 * sum(w.nbytes for w in model.get_weights())),
        ):
            exports.append(
                export_model(model, base, cfg.export.name, first_test, info.class_names, folded, cfg.export, int8)
            )
        log.info("exported version %d:", exports[0]["version"])
        for line in describe_export(exports[0]):
            log.info("  %s", line)

    last = records[final]
    summary = {
        "test_accuracy": results.pop("test_accuracy"),
        "val_accuracy": last["val_accuracy"],
        **results,
        "phases": records,
        "final_phase": final,
        "wall_time_s": round(time.perf_counter() - start, 1),
        **setup,
        "recipe": rundir.RECIPE,  # the settings used, every "auto" resolved, with the reasons
        "time_budget_minutes": cfg.runtime.time_budget_minutes,
        "trust_report_skipped_for_budget": skip_report,
        "weights_sha256": fingerprint,
        "temperature": temperature,  # fitted on val; folded into the exports with evaluate.fold_temperature
        "exports_calibrated": bool(cfg.evaluate.fold_temperature and temperature not in (None, 1.0)),
        "trust_report": report
        and {
            "file": "report.json",
            "quick": True,
            "tta_accuracy": report["tta"]["accuracy"],
            "ece_before": report["calibration"]["ece_before"],
            "ece_after": report["calibration"]["ece_after"],
            "corruption_mean_accuracy": report["corruptions"].get("mean_accuracy"),  # None: skipped
            "pgd_accuracy": report["adversarial"].get("pgd"),
            "wall_time_s": report["wall_time_s"],
        },
        "warnings": warnings,
        "image_sizes": {"storage": info.storage_size, "model": cfg.model.resolution},
        "dataset": rundir.DATASET,  # class names, storage size, counts: stored once, there
        "model": rundir.MODEL,
        "exports": exports,
    }
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    log.info(
        "test accuracy %.4f, balanced accuracy %.4f on %d images (val %.4f), %.0f s",
        summary["test_accuracy"],
        summary["test_balanced_accuracy"],
        summary["test_examples"],
        summary["val_accuracy"],
        summary["wall_time_s"],
    )
    return summary
