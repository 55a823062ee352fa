"""The "auto" settings resolved for one run: from the data, the machine and a time budget.

    recipe = Recipe(cfg, replicas=1, accelerator=False)
    cfg = recipe.before_data(survey(cfg.data))   # batch, resolution, epochs
    ... phase 1 ...
    cfg = recipe.after_head(head_val_accuracy)              # unfreeze depth, rate
    recipe.write(run_dir)                                   # recipe.yaml: a config

Every setting the config or --set gives keeps its value; each "auto" one is chosen by a
pure policy in tlkeras.policies and logged with its reason. With
runtime.time_budget_minutes, the frozen base's images/s and a few fine-tuning steps are
measured first (seconds), and policies.plan_budget picks the resolution, depth and
fine-tuning epochs that fit; DeadlineStop ends training at a step boundary if the
estimate was wrong, and the best weights so far are shipped. docs/recipes.md.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import yaml

from tlkeras import rundir
from tlkeras.bases import BASES
from tlkeras.config import AUTO, Config, dump_yaml, is_folder, to_flat_dict
from tlkeras.errors import UserError
from tlkeras.policies import (
    TOP_BLOCK,
    assign_splits,
    auto_batch_size,
    auto_epochs,
    auto_finetune_rate,
    auto_resolution,
    auto_unfreeze,
    plan_budget,
    unfreeze_start,
)
from tlkeras.rundir import RECIPE

log = logging.getLogger("tlkeras")
HEADER_SAMPLE = 64  # image headers read to estimate the photos' size: milliseconds
# Seconds after training that do not scale with the images, measured with VGG16 at 160x160
# on the 2 busy cores of a hymenoptera run (docs/recipes.md): the float model rebuilt and
# saved, the confusion matrix; the val temperature fit; SavedModel + ONNX with parity
# checks (66 s); a LiteRT conversion (a guess from the ONNX one).
START_S = 20.0
CALIBRATION_S = 50.0
EXPORT_S = 70.0
LITERT_S = 40.0


@dataclass(frozen=True)
class Survey:
    """What the recipe needs to know about the data before loading it: estimated split
    sizes and the median short side of the images (None: unknown)."""

    num_train: int
    num_val: int
    num_test: int
    short_side: int | None


def survey(cfg) -> Survey:
    """Counts from the folder listing or the tfds metadata, and the image size from at most
    HEADER_SAMPLE image headers (Pillow reads the size without decoding the pixels)."""
    if not is_folder(cfg.dataset):
        return _survey_tfds(cfg)
    from PIL import Image

    from tlkeras.data import list_folder

    tree, _, _ = list_folder(Path(cfg.dataset).expanduser())
    explicit = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    specs = assign_splits(list(tree), explicit)
    n = {split: sum(len(files) for files in classes.values()) for split, classes in tree.items()}
    fv = cfg.val_fraction if specs["val"] is None else 0.0
    ft = cfg.test_fraction if specs["test"] is None else 0.0
    train = round(n["train"] * (1 - fv - ft))
    val = n.get(specs["val"] or "", 0) or round(n["train"] * fv)
    test = n.get(specs["test"] or "", 0) or round(n["train"] * ft)
    files = sorted(p for classes in tree["train"].values() for p in classes)
    step = max(1, len(files) // HEADER_SAMPLE)
    sides = []
    for path in files[::step][:HEADER_SAMPLE]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - an unreadable file is the data scan's to report
            continue
    return Survey(train, val, test, int(statistics.median(sides)) if sides else None)


def _survey_tfds(cfg) -> Survey:
    from tlkeras.data import _feature_keys, _tfds_builder, _tfds_split_names, auto_tfds_splits

    builder = _tfds_builder(cfg)
    explicit = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    specs = auto_tfds_splits(_tfds_split_names(cfg, builder), explicit, cfg.val_fraction, cfg.test_fraction)

    def count(spec: str) -> int:
        """0 when tfds cannot say (no metadata yet); the real counts follow from the data."""
        try:
            return int(builder.info.splits[spec].num_examples)
        except (KeyError, ValueError, AssertionError):
            return 0

    image_key, _ = _feature_keys(cfg, builder.info.features)
    height, width, _ = builder.info.features[image_key].shape
    side = min(height, width) if height and width else None
    return Survey(count(specs["train"]), count(specs["val"]), count(specs["test"]), side)


class Recipe:
    """The resolved config of one run and the reason for every auto choice."""

    def __init__(self, cfg: Config, replicas: int = 1, accelerator: bool = False):
        self.user = cfg  # as given: "auto" marks what is chosen here
        self.cfg = cfg
        self.replicas = replicas
        self.accelerator = accelerator
        self.reasons: dict[str, str] = {}
        self.budget_s = cfg.runtime.time_budget_minutes * 60 if cfg.runtime.time_budget_minutes else None
        self.deadline: float | None = None  # perf_counter time by which training must stop
        self.after_s = 0.0  # estimated seconds of test, report and export after training
        self.finetune_ips: dict[str, float] = {}
        self.feature_ips = 0.0
        self.num_train = self.num_val = 0

    # -- choosing

    def _choose(self, key: str, value, reason: str) -> None:
        section, name = key.split(".")
        part = getattr(self.cfg, section)
        if getattr(part, name) == AUTO:
            self.cfg = dataclasses.replace(self.cfg, **{section: dataclasses.replace(part, **{name: value})})
            self.reasons[key] = reason
        elif key not in self.reasons:
            self.reasons[key] = "set in the config"

    def _set(self, key: str, value, reason: str) -> None:
        """A budget correction of a value chosen here (never of one the user set)."""
        section, name = key.split(".")
        part = getattr(self.cfg, section)
        self.cfg = dataclasses.replace(self.cfg, **{section: dataclasses.replace(part, **{name: value})})
        self.reasons[key] = reason

    def before_data(self, data: Survey, start: float | None = None, resumed: Path | None = None) -> Config:
        """Batch, resolution and both phases' lengths (and with a budget, fitted to it).
        `resumed`: the run folder of a resumed run, whose recipe.yaml is kept as it is (a
        budget counts from the first start and is not planned again)."""
        user = self.cfg
        if resumed is not None and (resumed / RECIPE).exists():
            from tlkeras.config import load_config

            self.num_train, self.num_val = data.num_train, data.num_val
            self.cfg = load_config(resumed / RECIPE)
            for key, value in to_flat_dict(user).items():
                if value == AUTO:
                    self.reasons[key] = f"as chosen before the interruption ({RECIPE})"
            return self.cfg
        backbone = user.model.backbone
        self.num_train, self.num_val = data.num_train, data.num_val
        self._choose("data.batch_size", *auto_batch_size(data.num_train, self.replicas, self.accelerator))
        self._choose("model.resolution", *auto_resolution(data.short_side, backbone, self.accelerator))
        (head, head_why), (finetune, ft_why) = auto_epochs(data.num_train, self.cfg.data.batch_size, self.accelerator)
        self._choose("head.epochs", head, head_why)
        self._choose("finetune.epochs", finetune, ft_why)
        if self.budget_s is not None:
            self._fit_budget(user, data, start if start is not None else time.perf_counter())
        return self.cfg

    def observed(self, num_train: int, num_val: int) -> None:
        """The split sizes as loaded (the survey's are estimates)."""
        self.num_train, self.num_val = num_train, num_val

    def after_head(self, probe_accuracy: float | None, now: float | None = None) -> Config:
        """Fine-tuning depth and rate from the dataset size and phase 1's val accuracy; with
        a budget, never deeper than planned and only the epochs still affordable."""
        n, backbone = self.num_train, self.cfg.model.backbone
        if self.deadline_passed(now):
            self._set("finetune.epochs", 0, "the time budget is spent")
        unfreeze, why = auto_unfreeze(n, probe_accuracy, backbone, self.accelerator)
        planned = self.cfg.finetune.unfreeze  # the budget's deepest affordable depth, or still auto
        if self.user.finetune.unfreeze == AUTO and planned != AUTO:
            if depth_index(backbone, unfreeze) < depth_index(backbone, planned):
                unfreeze, why = planned, f"{why}; no deeper than the time budget allows"
            self._set("finetune.unfreeze", unfreeze, why)
        else:
            self._choose("finetune.unfreeze", unfreeze, why)
        self._choose("finetune.learning_rate", *auto_finetune_rate(n, probe_accuracy))
        if self.deadline is not None and self.user.finetune.epochs == AUTO:
            now = time.perf_counter() if now is None else now
            ips = self.finetune_ips.get(self.cfg.finetune.unfreeze) or min(self.finetune_ips.values())
            epoch_s = self.num_train / ips + self.num_val / self.feature_ips
            fit = max(0, int((self.deadline - now) // epoch_s))
            if fit < self.cfg.finetune.epochs:
                self._set("finetune.epochs", fit, f"{fit} epochs of ~{epoch_s:.0f} s fit the time left")
        return self.cfg

    # -- the budget

    def _fit_budget(self, user: Config, data: Survey, start: float) -> None:
        backbone = user.model.backbone
        res = self.cfg.model.resolution
        if user.model.resolution == AUTO:
            lowest = min(res, 96)
            resolutions = list(range(res, lowest - 1, -32))
        else:
            resolutions = [res]
        depths = [user.finetune.unfreeze] if user.finetune.unfreeze != AUTO else _depth_candidates(data, backbone)
        self.feature_ips, self.finetune_ips = measure_throughput(self.cfg, res, depths)
        mirrored = user.data.augment and user.head.mirrored_features
        after_images, fixed = after_training(user, data)
        elapsed = time.perf_counter() - start
        left = self.budget_s - elapsed
        finetune_max = self.cfg.finetune.epochs
        plan = plan_budget(
            left,
            (data.num_train, data.num_val),
            self.feature_ips,
            self.finetune_ips,
            res,
            resolutions,
            self.cfg.head.epochs,
            finetune_max,
            after_images,
            fixed,
            mirrored,
        )
        minutes = self.budget_s / 60
        if not plan["fits"]:
            need = (plan["need_s"] + elapsed) / 60
            raise UserError(
                f"runtime.time_budget_minutes={minutes:g} is too short for phase 1 of {data.num_train} images "
                f"on this machine; it needs at least {need:.1f} minutes (or set a smaller model.resolution)"
            )
        why = f"time budget {minutes:g} min: {left:.0f} s left after {elapsed:.0f} s of start-up and measuring"
        if user.model.resolution == AUTO and plan["resolution"] != res:
            self._set("model.resolution", plan["resolution"], why)
        if user.finetune.unfreeze == AUTO:
            self._set("finetune.unfreeze", plan["unfreeze"], f"{why}; at most this deep (final choice after phase 1)")
        if user.finetune.epochs == AUTO and plan["finetune_epochs"] != finetune_max:
            self._set("finetune.epochs", plan["finetune_epochs"], why)
        scale = (res / self.cfg.model.resolution) ** 2
        self.feature_ips *= scale
        self.finetune_ips = {k: v * scale for k, v in self.finetune_ips.items()}
        self.after_s = after_images / self.feature_ips + fixed
        self.deadline = start + self.budget_s - self.after_s
        log.info(
            "recipe: time budget %.1f min: estimated %.1f min (frozen %.0f images/s, fine-tuning %s images/s at %dx%d)",
            minutes,
            (plan["estimate_s"] + elapsed) / 60,
            self.feature_ips,
            ", ".join(f"{k} {v:.1f}" for k, v in self.finetune_ips.items()),
            self.cfg.model.resolution,
            self.cfg.model.resolution,
        )

    def deadline_passed(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.perf_counter() if now is None else now) >= self.deadline

    # -- reporting

    def table(self) -> str:
        rows = [(k, _show(_get(self.cfg, k)), why) for k, why in self.reasons.items()]
        width = max(len(k) + len(v) for k, v, _ in rows) + 2
        return "\n".join(f"  {k} = {v}".ljust(width + 5) + f"  {why}" for k, v, why in rows)

    def write(self, run_dir: Path) -> None:
        """recipe.yaml: the resolved config (loadable with --config) with the reasons as
        comments; settings still "auto" are decided after phase 1."""
        comments = "".join(f"#   {k}: {why}\n" for k, why in self.reasons.items())
        text = (
            "# The recipe tlkeras chose for this run (docs/recipes.md); rerun it with\n"
            "#   python -m tlkeras.train --config <this file>\n"
            f"# Why:\n{comments}" + dump_yaml(self.cfg)
        )
        yaml.safe_load(text)  # never write a file that does not load
        rundir.write_atomic(run_dir / RECIPE, text)

    def log(self, stage: str) -> None:
        log.info("recipe (%s):\n%s", stage, self.table())


def data_settings(cfg: Config, accelerator: bool = False) -> Config:
    """`cfg` with the auto settings the data pipeline reads (batch, resolution) chosen, for
    tools that read the data without training (tlkeras.doctor); no budget applies."""
    runtime = dataclasses.replace(cfg.runtime, time_budget_minutes=None)
    return Recipe(dataclasses.replace(cfg, runtime=runtime), accelerator=accelerator).before_data(survey(cfg.data))


def after_training(cfg: Config, data: Survey) -> tuple[int, float]:
    """(frozen-speed forward passes, fixed seconds) of what follows training: the test
    split, the quick trust report (clean + TTA, val calibration, 7 x 5 corruptions of 40
    images, FGSM and PGD-10 on 32 images: about 4,500 passes), the val temperature, the
    exports (each int8 variant: its calibration images and its test-accuracy gate)."""
    images, fixed = data.num_test, START_S
    if cfg.evaluate.enabled:
        images += 2 * min(data.num_test, cfg.evaluate.quick_test_images) + data.num_val + 7 * 5 * 40 + 4500
    elif cfg.evaluate.fold_temperature:
        images, fixed = images + data.num_val, fixed + CALIBRATION_S
    if cfg.export.enabled:
        fixed += EXPORT_S + (LITERT_S if cfg.export.litert else 0.0)
        gate = min(data.num_test, cfg.export.int8_test_images or data.num_test)
        variants = cfg.export.int8_onnx + (cfg.export.litert and cfg.export.int8_litert)
        images += variants * (cfg.export.calibration_images + gate)
    return images, fixed


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def depth_index(backbone: str, unfreeze: str) -> int:
    """The index of the first trained layer: larger is shallower (cheaper)."""
    base = BASES[backbone]
    return unfreeze_start(list(base.layers), base.blocks, unfreeze, base.label)


def _depth_candidates(data: Survey, backbone: str) -> list[str]:
    """The depth the data alone would get (before the probe), then the top block."""
    deepest, _ = auto_unfreeze(data.num_train, None, backbone, accelerator=False)
    return list(dict.fromkeys([deepest, TOP_BLOCK[backbone]]))


def measure_throughput(cfg: Config, resolution: int, depths: list[str], batch: int = 16) -> tuple[float, dict]:
    """(frozen base images/s, {depth: fine-tuning images/s}) at `resolution`, on random
    images, after one untimed step each (tracing): about 20-40 s for VGG16 on 2 cores."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tlkeras.data import DatasetInfo
    from tlkeras.model import build_model, set_finetune_trainable, split_at_features

    batch = min(batch, cfg.data.batch_size)
    info = DatasetInfo(name="measure", source="tfds", class_names=("a", "b"), storage_size=resolution)
    model_cfg = dataclasses.replace(cfg.model, resolution=resolution)
    model = build_model(model_cfg, info)
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    labels = np.zeros(batch, np.int64)
    extractor, _ = split_at_features(model)
    forward = tf.function(lambda x: extractor(x, training=False))

    def timed(step, repeats: int = 2) -> float:
        step()  # tracing and first-call allocation
        begin = time.perf_counter()
        for _ in range(repeats):
            step()
        return repeats * batch / (time.perf_counter() - begin)

    feature_ips = timed(lambda: forward(images).numpy(), 3)
    finetune_ips = {}
    for depth in depths:
        set_finetune_trainable(model, depth)
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
        finetune_ips[depth] = timed(lambda: model.train_on_batch(images, labels))
    return feature_ips, finetune_ips


class DeadlineStop(keras.callbacks.Callback):
    """Ends `fit` at the first step boundary after `deadline` (time.perf_counter) by
    model.stop_training: Keras still validates the cut epoch and the checkpoint callback
    keeps the best weights, so the run goes on to test and export them."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline
        self.stopped = False

    def on_train_batch_end(self, batch, logs=None):
        if not self.stopped and time.perf_counter() >= self.deadline:
            self.stopped = True
            self.model.stop_training = True
            log.warning("time budget: training stops after this step; the best weights so far are shipped")
