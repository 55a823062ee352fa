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
    FINETUNE_EPOCHS,
    PLAN_MARGIN,
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
# What follows training, charged in forward passes of the shipped float32 model (at its
# speed measured before training) plus fixed seconds, fitted to six quiet runs of VGG16 on
# a 2-core CPU at 64-160 px (docs/recipes.md): the test part took 8-21 s, the val
# temperature alone 8 s, the quick report 5-102 s, the exports 49-142 s.
START_S = 5.0  # the float model rebuilt and saved, the confusion matrix
CALIBRATION_S = 5.0  # the val temperature's fit
REPORT_S = 10.0  # the report's own tracing and plots
# The quick report's corruptions (7 kinds x 5 severities, made on the CPU) and attacks
# (FGSM at 4 strengths, PGD-10 at 4), in passes per image: 44 s for 40 images and 36 s for
# 32 at 48 passes/s (128 px).
CORRUPTION_PASSES = 53
ATTACK_PASSES = 54
EXPORT_S = 25.0  # SavedModel and ONNX conversions with their parity checks
LITERT_S = 15.0
INT8_CALIBRATION_PASSES = 5  # per calibration image: the converter's float calibration is slow
# The shipped model's passes after training run about 1.8x the speed measured on a batch of
# 16 random images (larger batches, a warm graph): 61 s of report and 61 s of exports were
# estimated at 96 and 97 s at 96 px from the raw measurement (quiet).
INFERENCE_EFFICIENCY = 1.8
# The frozen-feature pass of phase 1 runs at about 0.7 of the speed measured on random
# images in memory (reading, mirroring and storing the features: 218 against 306 images/s
# at 96 px, quiet); planned with it, a quiet run observes a slowdown near 1.
FEATURE_PASS_EFFICIENCY = 0.7
# What follows training, in order: each part is (frozen-speed forward passes, fixed s).
AFTER_PARTS = ("test", "report", "export")
MEASURE_S = 20.0  # seconds of a run's own work that make a measurement of its speed
BUDGET = "budget.json"  # the measured speeds and the first start: a resumed run's deadline


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
        self.end: float | None = None  # perf_counter time by which the whole run must end
        self.after: dict[str, tuple[int, float]] = {}  # what follows training (after_training)
        self.slowdown = self._said = 1.0  # the run's own time / the planned time for the same work
        self.finetune_ips: dict[str, float] = {}
        self.feature_ips = 0.0
        self.finetune_max = 0  # the most fine-tuning epochs a budget buys
        self.inference_ips = 0.0  # the shipped float32 model's forward passes: what follows training
        self.num_train = self.num_val = 0
        self.resumed = False  # a resumed run keeps its recipe: only its deadline is set again
        self.report_dropped = False  # the trust report left out of the plan to fit the budget
        self.started = 0.0  # time.time() of the first start (budget.json)
        self._shown = ""

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
        start = time.perf_counter() if start is None else start
        if resumed is not None and (resumed / RECIPE).exists():
            from tlkeras.config import load_config

            self.num_train, self.num_val = data.num_train, data.num_val
            self.cfg = load_config(resumed / RECIPE)
            self.resumed = True
            for key, value in to_flat_dict(user).items():
                if value == AUTO:
                    self.reasons[key] = f"as chosen before the interruption ({RECIPE})"
            self._resume_budget(resumed, start)
            return self.cfg
        backbone = user.model.backbone
        self.num_train, self.num_val = data.num_train, data.num_val
        self._choose("data.batch_size", *auto_batch_size(data.num_train, self.replicas, self.accelerator))
        self._choose("model.resolution", *auto_resolution(data.short_side, backbone, self.accelerator))
        (head, head_why), (finetune, ft_why) = auto_epochs(data.num_train, self.cfg.data.batch_size, self.accelerator)
        self._choose("head.epochs", head, head_why)
        self._choose("finetune.epochs", finetune, ft_why)
        if self.budget_s is not None:
            self._fit_budget(user, data, start)
        return self.cfg

    def observed(self, num_train: int, num_val: int, num_test: int) -> None:
        """The split sizes as loaded (the survey's are estimates): what follows training is
        charged for them."""
        self.num_train, self.num_val = num_train, num_val
        if self.end is not None and not self.resumed:
            survey = Survey(num_train, num_val, num_test, None)
            self.after = after_training(self.user, survey, report=not self.report_dropped)

    def after_head(
        self,
        probe_accuracy: float | None,
        now: float | None = None,
        feature_images_per_s: float | None = None,
        feature_seconds: float | None = None,
    ) -> Config:
        """Fine-tuning depth and rate from the dataset size and phase 1's val accuracy; with
        a budget, never deeper than planned and only the epochs still affordable.
        `feature_images_per_s`: the frozen base's speed in phase 1's feature pass (None if
        the features were reused): the estimates of what follows are scaled by how far it
        fell short of the measured one, if the pass took `feature_seconds` >= MEASURE_S (a
        pass of a few dozen images is mostly tracing: no measure of the machine)."""
        n, backbone = self.num_train, self.cfg.model.backbone
        long_enough = feature_seconds is None or feature_seconds >= MEASURE_S
        if self.end is not None and feature_images_per_s and long_enough:
            self.observe(self.feature_ips / feature_images_per_s)
        if self.deadline_passed(now) and not self.resumed:
            self._set("finetune.epochs", 0, "the time budget is spent")
        unfreeze, why = auto_unfreeze(n, probe_accuracy, backbone, self.accelerator)
        planned = self.cfg.finetune.unfreeze  # the budget's deepest affordable depth, or still auto
        if self.user.finetune.unfreeze == AUTO and planned != AUTO and not self.resumed:
            if depth_index(backbone, unfreeze) < depth_index(backbone, planned):
                unfreeze, why = planned, f"{why}; no deeper than the time budget allows"
            self._set("finetune.unfreeze", unfreeze, why)
        else:
            self._choose("finetune.unfreeze", unfreeze, why)
        self._choose("finetune.learning_rate", *auto_finetune_rate(n, probe_accuracy))
        if self.deadline is not None and self.user.finetune.epochs == AUTO and not self.resumed:
            now = time.perf_counter() if now is None else now
            ips = self.finetune_ips.get(self.cfg.finetune.unfreeze) or min(self.finetune_ips.values())
            epoch_s = (self.num_train / ips + self.num_val / self.feature_ips) * self.slowdown
            # Both ways: a run faster than planned spends the time on fine-tuning, up to the
            # bound; the margin is the plan's, for the estimate's error.
            fit = min(self.finetune_max, max(0, int(PLAN_MARGIN * (self.deadline - now) // epoch_s)))
            if fit != self.cfg.finetune.epochs:
                self._set("finetune.epochs", fit, f"{fit} epochs of ~{epoch_s:.0f} s fit the time left after phase 1")
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
        self.feature_ips, self.finetune_ips, self.inference_ips = measure_throughput(self.cfg, res, depths)
        self.feature_ips *= FEATURE_PASS_EFFICIENCY
        self.inference_ips *= INFERENCE_EFFICIENCY
        mirrored = user.data.augment and user.head.mirrored_features
        elapsed = time.perf_counter() - start
        left = self.budget_s - elapsed
        # A budget buys fine-tuning epochs up to the policy's bound, not only the auto count:
        # the best epoch by val accuracy is kept, so more epochs cost time, not accuracy.
        finetune_max = FINETUNE_EPOCHS[self.accelerator][1] if user.finetune.epochs == AUTO else user.finetune.epochs
        self.finetune_max = finetune_max

        def plan_for(after: dict[str, tuple[int, float]]) -> dict:
            after_images, fixed = (sum(part) for part in zip(*after.values()))
            after_images = round(after_images * self.feature_ips / self.inference_ips)  # in frozen passes
            counts = (data.num_train, data.num_val)
            speeds = (self.feature_ips, self.finetune_ips, res, resolutions)
            lengths = (self.cfg.head.epochs, finetune_max)
            return plan_budget(left, counts, *speeds, *lengths, after_images, fixed, mirrored)

        self.after = after_training(user, data)
        plan = plan_for(self.after)
        if not plan["fits"] and user.evaluate.enabled:  # the trust report goes first, the exports never
            without = after_training(user, data, report=False)
            plan_without = plan_for(without)
            if plan_without["fits"]:
                self.after, plan, self.report_dropped = without, plan_without, True
                log.warning(
                    "time budget: the quick trust report does not fit and is left out; "
                    "python -m tlkeras.evaluate --run-dir <run> runs it after training"
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
        if user.finetune.epochs == AUTO and plan["finetune_epochs"] != self.cfg.finetune.epochs:
            self._set("finetune.epochs", plan["finetune_epochs"], f"{why}; at most {finetune_max} epochs")
        scale = (res / self.cfg.model.resolution) ** 2
        self.feature_ips *= scale
        self.inference_ips *= scale
        self.finetune_ips = {k: v * scale for k, v in self.finetune_ips.items()}
        self.end = start + self.budget_s
        self.started = time.time() - (time.perf_counter() - start)
        log.info(
            "recipe: time budget %.1f min: estimated %.1f min (frozen %.0f images/s, shipped model %.0f, "
            "fine-tuning %s images/s at %dx%d)",
            minutes,
            (plan["estimate_s"] + elapsed) / 60,
            self.feature_ips,
            self.inference_ips,
            ", ".join(f"{k} {v:.1f}" for k, v in self.finetune_ips.items()),
            self.cfg.model.resolution,
            self.cfg.model.resolution,
        )

    def _resume_budget(self, run_dir: Path, start: float) -> None:
        """The deadline of a resumed budget run: the budget less the time the run had spent
        when it stopped (its last file write), counted from this start."""
        saved = rundir.read_json(run_dir / BUDGET)
        if self.budget_s is None or not saved:
            return
        self.feature_ips, self.finetune_ips = saved["feature_ips"], saved["finetune_ips"]
        self.inference_ips, self.report_dropped = saved["inference_ips"], saved["report_dropped"]
        self.after = {part: tuple(value) for part, value in saved["after"].items()}
        self.started = saved["started"]
        now = time.time() - (time.perf_counter() - start)  # this start: what this process wrote is newer
        written = [path.stat().st_mtime for path in run_dir.rglob("*") if path.is_file()]
        spent = max([self.started, *(t for t in written if t < now)]) - self.started
        self.end = start + max(0.0, self.budget_s - spent)
        log.info(
            "time budget: %.1f of %g minutes were spent before the interruption; the rest counts from now",
            spent / 60,
            self.budget_s / 60,
        )

    def skips_report(self, now: float | None = None) -> bool:
        """Whether the quick trust report is left out to end within the budget: planned so,
        or it no longer fits with the exports after it."""
        return self.report_dropped or not self.affordable("report", now)

    def seconds(self, *parts: str) -> float:
        """Estimated seconds of these parts of what follows training (AFTER_PARTS), at the
        measured frozen speed times the slowdown observed so far."""
        return self.slowdown * sum(self.after[p][0] / self.inference_ips + self.after[p][1] for p in parts)

    @property
    def deadline(self) -> float | None:
        """perf_counter time by which training must stop for the rest to end by the
        budget; None without a budget."""
        return None if self.end is None else self.end - self.seconds(*AFTER_PARTS)

    def deadline_passed(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.perf_counter() if now is None else now) >= self.deadline

    def observe(self, slowdown: float) -> None:
        """The run's own time over the planned time for the same work (>1: slower than
        measured, e.g. other jobs started); kept within 0.8-4: a pass that happened to run
        faster than measured says less about what follows than a slower one."""
        self.slowdown = min(4.0, max(0.8, slowdown))
        if abs(self.slowdown - self._said) > 0.15 * self._said:
            self._said = self.slowdown
            log.info("time budget: this run takes %.2fx the time measured at its start", self.slowdown)

    def affordable(self, part: str, now: float | None = None) -> bool:
        """Whether `part` of what follows training, and every part after it, still ends
        within the budget (always True without one)."""
        if self.end is None:
            return True
        rest = AFTER_PARTS[AFTER_PARTS.index(part) :]
        return (time.perf_counter() if now is None else now) + self.seconds(*rest) <= self.end

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
        if self.end is not None and not self.resumed:  # what a resumed run's deadline is set from
            speeds = {"feature_ips": self.feature_ips, "finetune_ips": self.finetune_ips}
            state = {"started": self.started, **speeds, "inference_ips": self.inference_ips, "after": self.after}
            state["report_dropped"] = self.report_dropped
            rundir.write_json(run_dir / BUDGET, state)

    def log(self, stage: str) -> None:
        """The table, unless it is the one logged last (a resumed run after phase 1)."""
        table = self.table()
        if table != self._shown:
            self._shown = table
            log.info("recipe (%s):\n%s", stage, table)


def data_settings(cfg: Config, accelerator: bool = False) -> Config:
    """`cfg` with the auto settings the data pipeline reads (batch, resolution) chosen, for
    tools that read the data without training (tlkeras.doctor); no budget applies."""
    runtime = dataclasses.replace(cfg.runtime, time_budget_minutes=None)
    return Recipe(dataclasses.replace(cfg, runtime=runtime), accelerator=accelerator).before_data(survey(cfg.data))


def after_training(cfg: Config, data: Survey, report: bool = True) -> dict[str, tuple[int, float]]:
    """{part: (frozen-speed forward passes, fixed seconds)} of what follows training, in
    AFTER_PARTS order: "test" (the cut epoch's validation, the test split, the model
    saved), "report" (the quick trust report: clean + TTA, val calibration, and unless a
    small run skips them, corruptions and attacks; without it, the val temperature
    alone), "export" (each int8 variant: its calibration images and its test-accuracy
    gate). Passes are of the shipped float32 model. `report=False`: as if the trust report
    were turned off (a budget leaving it out)."""
    from tlkeras.evaluate import quick_skip_reason

    test = (data.num_val + data.num_test, START_S)
    charged = (0, 0.0)
    if cfg.evaluate.enabled and report:
        tested = min(data.num_test, cfg.evaluate.quick_test_images)
        hard = 0
        if not quick_skip_reason(data.num_train, tested):
            e = cfg.evaluate
            hard = CORRUPTION_PASSES * e.quick_corruption_images + ATTACK_PASSES * e.quick_adversarial_images
        charged = (2 * tested + data.num_val + hard, REPORT_S)
    elif cfg.evaluate.fold_temperature:
        charged = (data.num_val, CALIBRATION_S)
    export = (0, 0.0)
    if cfg.export.enabled:
        gate = min(data.num_test, cfg.export.int8_test_images or data.num_test)
        variants = cfg.export.int8_onnx + (cfg.export.litert and cfg.export.int8_litert)
        export = (
            variants * (INT8_CALIBRATION_PASSES * cfg.export.calibration_images + gate),
            EXPORT_S + (LITERT_S if cfg.export.litert else 0.0),
        )
    return {"test": test, "report": charged, "export": export}


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


def measure_throughput(
    cfg: Config, resolution: int, depths: list[str], batch: int = 16
) -> tuple[float, dict[str, float], float]:
    """(frozen base images/s, {depth: fine-tuning images/s}, float32 forward images/s) at
    `resolution`, on random images, each over >= 2 s after two untimed calls: 10-20 s for
    VGG16 at 96-128 px on 2 cores. The last is the speed of the shipped model, which computes in
    float32 whatever the training precision (3-4x slower than bfloat16 on AMX), for the
    test, the trust report and the exports' checks."""
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

    def timed(step, seconds: float = 2.0) -> float:
        """images/s over at least two calls and `seconds`, after two untimed calls: the
        first traces, the second still allocates (oneDNN primitives)."""
        step()
        step()
        calls, begin = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - begin < seconds:
            step()
            calls += 1
        return calls * batch / (time.perf_counter() - begin)

    feature_ips = timed(lambda: forward(images).numpy())
    finetune_ips = {}
    for depth in depths:
        set_finetune_trainable(model, depth)
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
        finetune_ips[depth] = timed(lambda: model.train_on_batch(images, labels))
    inference_ips = feature_ips
    policy = keras.mixed_precision.global_policy()
    if policy.compute_dtype != "float32":
        try:
            keras.mixed_precision.set_global_policy("float32")
            shipped = build_model(model_cfg, info, load_weights=False)
            shipped_forward = tf.function(lambda x: shipped(x, training=False))
            inference_ips = timed(lambda: shipped_forward(images).numpy())
        finally:
            keras.mixed_precision.set_global_policy(policy)
    return feature_ips, finetune_ips, inference_ips


class DeadlineStop(keras.callbacks.Callback):
    """Ends `fit` at the first step boundary after `recipe.deadline` by
    model.stop_training: Keras still validates the cut epoch and the checkpoint callback
    keeps the best weights, so the run goes on to test and export them. With
    `planned_images_per_s` (fine-tuning), the steps' own speed, timed between batches
    within an epoch, updates `recipe.slowdown`, and with it the deadline."""

    def __init__(self, recipe: Recipe, images_per_call: int, planned_images_per_s: float | None = None):
        super().__init__()
        self.recipe = recipe
        self.images_per_call = images_per_call  # the global batch x runtime.steps_per_execution
        self.planned = planned_images_per_s
        self.stopped = False
        self.last: float | None = None
        self.images = 0
        self.seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.last = None  # the first step of an epoch waits for the input pipeline to refill

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.last is not None:
            self.images += self.images_per_call
            self.seconds += now - self.last
        self.last = now
        if self.planned and self.seconds >= MEASURE_S:  # enough steps to be a measurement
            self.recipe.observe(self.planned / (self.images / self.seconds))
        if not self.stopped and self.recipe.deadline_passed(now):
            self.stopped = True
            self.model.stop_training = True
            log.warning("time budget: training stops after this step; the best weights so far are shipped")
