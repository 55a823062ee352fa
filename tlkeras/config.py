"""The typed configuration tree, its YAML mirror and `--set key=value` overrides.

    cfg = load_config("configs/cpu.yaml", ["head.epochs=2", "model.weights=null"])

The defaults below are the full GPU recipe (`configs/default.yaml` repeats them); other
YAML files list only what differs. Unknown keys and wrong types raise ConfigError naming
the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tlkeras.bases import BASES
from tlkeras.errors import ConfigError
from tlkeras.policies import unfreeze_start

# A setting typed `int | Auto` (or `float | Auto`) is chosen per run by tlkeras.recipe from
# the data, the machine and runtime.time_budget_minutes, unless the config or --set gives
# a value; the run folder's recipe.yaml holds what was chosen and why (docs/recipes.md).
Auto = Literal["auto"]
AUTO: Auto = "auto"


@dataclass
class DataConfig:
    # A tfds name, or a folder of class subfolders: <root>/<class>/<image>, or with split
    # folders <root>/{train,val|validation,test}/<class>/<image>. A path (with '/', or
    # starting with '.' or '~', or an existing folder) is a folder; relative to the
    # current directory.
    dataset: str = "cifar10"
    data_dir: str | None = None  # tfds only. None: tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    download: bool = True  # tfds only; offline with no local copy, tfds retries for minutes: set false
    # Split strings in tfds syntax ('train[:90%]', 'test', 'train[:100]+val'); for folders
    # the names are the split folders (a flat folder is one split, 'train'). null: automatic:
    # a published test split (test/, else val|validation/), a published validation split
    # if still free, else stratified carves of train by the fractions below; the split
    # that picks the best epoch never gives the reported number.
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    val_fraction: float = 0.1  # of train, when val is carved (tfds: whole percents)
    test_fraction: float = 0.1  # of train, when there is no test (or val) split to use
    # Storage size S: every image is centre-cropped to a square and resized to S x S
    # (aspect ratio kept, edges of non-square images cropped). null: the dataset's own
    # square size (32 for CIFAR-10), else model.resolution.
    storage_size: int | None = None
    batch_size: int | Auto = AUTO  # global: split evenly across replicas; auto: from the train images
    shuffle_buffer: int = 10_000  # training examples shuffled at a time (per epoch, seeded)
    augment: bool = True  # random flip + random translation (S/8), train split only
    # Keep the decoded uint8 images in memory after the first pass (CIFAR-10: 180 MB).
    # auto: only when all splits fit in half the available memory (MemAvailable), else read
    # every epoch from the prepared shards (folders) or tfds's records; true: always, refused
    # up front when they cannot fit; false: never.
    cache: bool | Auto = AUTO
    # Where folders are prepared (decoded once into TFRecord shards at S); null: the tlkeras
    # cache (~/.cache/tlkeras/prepared, or $TLKERAS_CACHE_DIR/prepared). See docs/scale.md.
    prepared_dir: str | None = None
    class_weight: bool = False  # weight each class by n / (classes * count): for imbalanced data
    # A file naming images to leave out of the run (the folder is never touched): the `path`
    # column of a CSV (tlkeras.doctor's flagged.csv) or one path per line; tfds examples as
    # "<split>[index]". The splits are drawn first, then the files removed; dataset.json lists them.
    exclude: str | None = None
    # At the start of training, one line on exact duplicates and leaks between splits (file
    # hashes of a folder: seconds); `python -m tlkeras.doctor` gives the full report.
    doctor: bool = True


@dataclass
class ModelConfig:
    # The ImageNet base: vgg16, or mobilenet_v2 (about 6x the feature-extraction images/s
    # on a 2-core CPU; its BatchNorm layers stay frozen, in inference mode, in both phases).
    backbone: str = "vgg16"
    # "imagenet", null (random init) or a path to the backbone's notop weights file
    # (.h5 or Keras 3 .weights.h5; tlkeras.bases.BASES names the Keras file of each)
    weights: str | None = "imagenet"
    # The model's input resolution: the data's S x S images are resized to this inside the
    # model. auto: the base's 224 on an accelerator, 160 on a CPU, never far past the
    # images' own median short side.
    resolution: int | Auto = AUTO
    head_units: int = 256  # the head's dense layer, between the pooled features and the softmax
    dropout: float = 0.5  # before the softmax layer


@dataclass
class HeadConfig:
    """Phase 1: the base is frozen, only the new head trains on its features, computed once."""

    # On the cached features: seconds each on a CPU. auto: BiT-style bucket of the dataset size.
    epochs: int | Auto = AUTO
    learning_rate: float = 1e-3  # Adam, constant
    # With data.augment, also compute the features of the mirrored training images (twice
    # the extraction time): the one augmentation that survives caching.
    mirrored_features: bool = True


@dataclass
class FinetuneConfig:
    """Phase 2: unfreeze and fine-tune at a low rate (0 epochs skips the phase)."""

    # 0 skips the phase; the epoch count continues from phase 1's. auto: BiT-style bucket
    # of the dataset size, scaled down on a CPU.
    epochs: int | Auto = AUTO
    # Peak, reached after warm-up, then cosine decay to 0. auto: 1e-5 to 1e-4 from the
    # dataset size and the frozen features' val accuracy after phase 1.
    learning_rate: float | Auto = AUTO
    warmup_epochs: float = 1.0  # protects the freshly trained head from large early updates
    # "all", a block ("block4") or a layer ("block5_conv1") and above; auto: from the
    # dataset size and the frozen features' val accuracy after phase 1.
    unfreeze: str = AUTO
    # Adversarial fine-tuning: every batch is replaced by FGSM examples from a random start
    # (Wong et al. 2020), about 2x the phase's time; the best epoch is then picked by PGD-10
    # accuracy at `epsilon` on the first robust_check_images validation images (the guard
    # against catastrophic overfitting), and this phase is shipped.
    adversarial: bool = False
    epsilon: float = 2.0  # L-infinity budget in pixel levels: 2 = 2/255
    step_size: float | None = None  # pixel levels; null: 1.25 * epsilon (Wong et al.)
    robust_check_images: int = 128  # PGD-10: 11 passes each, ~1/7 of an adversarial epoch on 5,000 images


@dataclass
class RuntimeConfig:
    strategy: str = "auto"  # auto | default | mirrored | multi_worker
    # auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with AMX/AVX512-BF16,
    # float32 otherwise; or a Keras policy name.
    mixed_precision: str = "auto"
    jit_compile: bool = False  # XLA compilation of the training step
    steps_per_execution: int = 1  # steps per call into the graph: fewer Python round trips for small models
    # Minutes between resume backups inside an epoch (taken at a step boundary; there is
    # one at every epoch end too), so a kill loses about this much work plus a step. One
    # backup of VGG16 with its Adam state (176 MB) takes about 0.4 s on 2 CPU cores:
    # under 1% of a minute. 0: epoch ends only.
    backup_minutes: float = 1.0
    # True: two runs with the same seed give identical metrics.csv and weights (TF op
    # determinism; slower, see docs/reliability.md). False: the data order is still the
    # seed's, but parallel float sums may round differently from run to run.
    deterministic: bool = False
    # Multi-worker: seconds a worker waits for its peers to answer before it stops with
    # an error naming them (rather than hanging).
    peer_timeout_s: float = 600.0
    # Fit the auto settings to this many minutes of wall time from the command's start
    # (test, report and export included), after measuring this machine's speed for 10-20 s;
    # the trust report is left out first if it cannot fit; training stops at a step
    # boundary and ships the best weights if the estimate was wrong. null: no budget.
    time_budget_minutes: float | None = None


@dataclass
class ExportConfig:
    enabled: bool = True  # SavedModel + ONNX, parity-checked, at the end of training
    name: str = "tlkeras"  # TF Serving's model name: <base>/<name>/<version>/
    base: str | None = None  # None: <run_dir>/export
    # LiteRT: <base>/litert/<name>/<version>/model.tflite, float32, builtin ops only, the class
    # names in its metadata (MediaPipe Tasks shows them), held to the same parity gate.
    litert: bool = True
    # int8 for CPUs and edge devices, calibrated on training images; each is published only
    # when its test accuracy is within int8_max_drop points of the float model's (docs/litert.md).
    int8_litert: bool = True  # model.int8.tflite: full-integer, uint8 input (with litert on)
    int8_onnx: bool = True  # onnx/<name>/<version>/model.int8.onnx: QDQ, per-channel
    int8_max_drop: float = 1.0  # accuracy points; negative demands int8 beat float by that much
    calibration_images: int = 256  # a seeded sample of the training split
    int8_test_images: int | None = 10000  # the gate's test images (the first ones); null: all


@dataclass
class EvaluateConfig:
    """The trust report (tlkeras.evaluate): calibration, TTA, corruptions, attacks."""

    enabled: bool = True  # the quick report at the end of training (about +10% wall time)
    # Exports output softmax(logits / T), T fitted on the val split (one scalar, Guo et al.
    # 2017): same classes, better-calibrated probabilities. T is in summary.json.
    fold_temperature: bool = True
    # Images, seeded subsets of the test split, for `python -m tlkeras.evaluate` ...
    test_images: int | None = None  # clean, TTA and calibration; null: the whole split
    corruption_images: int = 1000  # per corruption and severity (7 x 5 of them)
    adversarial_images: int = 500  # per attack and budget (FGSM and PGD-10 at 1, 2, 4, 8 /255)
    # ... and for --quick and the report after training.
    quick_test_images: int = 1000
    quick_corruption_images: int = 40
    quick_adversarial_images: int = 32


@dataclass
class DoctorConfig:
    """`python -m tlkeras.doctor`: label errors, duplicates, leaks and outliers from the frozen features."""

    folds: int = 5  # k of the seeded k-fold linear probe whose out-of-fold probabilities cleanlab reads
    # Two images are near-duplicates at this cosine similarity of their (centred) features or above.
    near_duplicate_similarity: float = 0.95
    # An image is an outlier when cleanlab's out-of-distribution score (kNN distance in
    # feature space, in [0, 1]: lower is more unusual) falls this far below the median, in
    # robust standard deviations (1.4826 x median absolute deviation).
    outlier_deviations: float = 3.0
    gallery_images: int = 40  # per issue kind, the highest-scoring first


@dataclass
class Config:
    name: str | None = None  # names the default run folder; null: <backbone>-<dataset>, e.g. vgg16-cifar10
    seed: int = 0  # fixes the carves, the initial head and every epoch's data order and augmentation
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)


RENAMED = {"data.image_size": "data.storage_size", "model.image_size": "model.resolution"}
CHOICES = {
    "model.backbone": tuple(BASES),  # vgg16, mobilenet_v2
    "runtime.strategy": ("auto", "default", "mirrored", "multi_worker"),
    "runtime.mixed_precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
}
POSITIVE = (
    "data.batch_size",
    "data.storage_size",
    "data.shuffle_buffer",
    "model.resolution",
    "model.head_units",
    "head.epochs",
    "head.learning_rate",
    "finetune.learning_rate",
    "runtime.steps_per_execution",
    "runtime.peer_timeout_s",
    "export.calibration_images",
    "export.int8_test_images",
    "runtime.time_budget_minutes",
    "finetune.epsilon",
    "finetune.step_size",
    "finetune.robust_check_images",
    "evaluate.test_images",
    "evaluate.corruption_images",
    "evaluate.adversarial_images",
    "evaluate.quick_test_images",
    "evaluate.quick_corruption_images",
    "evaluate.quick_adversarial_images",
    "doctor.outlier_deviations",
    "doctor.gallery_images",
)
NON_NEGATIVE = ("finetune.epochs", "finetune.warmup_epochs", "runtime.backup_minutes")


def add_config_arguments(parser, example: str) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` (args.config, args.overrides), as
    train, doctor and prepare take them; `example` is shown in --set's help."""
    parser.add_argument("--config", help="YAML file listing settings that differ from the defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one setting, e.g. --set {example} (repeatable)",
    )


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each `key=value` override, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; see configs/ for examples")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of settings")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not KEY=VALUE, e.g. head.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    flat = to_flat_dict(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(allowed)}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    for key in POSITIVE:
        if flat[key] not in (None, AUTO) and flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be greater than 0")
    for key in NON_NEGATIVE:
        if flat[key] != AUTO and flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be 0 or more")
    if not (
        0 <= cfg.data.val_fraction < 1
        and 0 <= cfg.data.test_fraction < 1
        and cfg.data.val_fraction + cfg.data.test_fraction < 1
    ):
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction} and data.test_fraction="
            f"{cfg.data.test_fraction} must each be in [0, 1) and leave some training data"
        )
    if not cfg.data.dataset:
        raise ConfigError("data.dataset is empty; give a tfds name (cifar10) or a folder path")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    base = BASES[cfg.model.backbone]
    if cfg.finetune.unfreeze != AUTO:  # now, not after phase 1
        unfreeze_start(base.layers, base.blocks, cfg.finetune.unfreeze, base.label)
    if not 0 <= cfg.seed < 2**32:  # Keras's set_random_seed range
        raise ConfigError(f"seed={cfg.seed} must be between 0 and 2**32 - 1")
    if cfg.name is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name) or cfg.name in (".", "..")):
        raise ConfigError(
            f"name={cfg.name!r} must be a plain folder name (letters, digits, '_', '-', '.'), e.g. photos-v1"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.export.name) or cfg.export.name in ("onnx", "litert", ".", ".."):
        raise ConfigError(
            f"export.name={cfg.export.name!r} must be a plain folder name (letters, digits, "
            f"'_', '-', '.') other than 'onnx' and 'litert', e.g. tlkeras"
        )
    if cfg.model.resolution != AUTO and cfg.model.resolution < 32:
        raise ConfigError(f"model.resolution={cfg.model.resolution} must be at least 32")
    if cfg.doctor.folds < 2:
        raise ConfigError(f"doctor.folds={cfg.doctor.folds} must be at least 2")
    if not 0 < cfg.doctor.near_duplicate_similarity <= 1:
        raise ConfigError(f"doctor.near_duplicate_similarity={cfg.doctor.near_duplicate_similarity} must be in (0, 1]")


def is_folder(dataset: str) -> bool:
    """data.dataset names a folder (has a separator, starts with . or ~, or is an existing
    folder) rather than a tfds dataset."""
    return "/" in dataset or os.sep in dataset or dataset.startswith((".", "~")) or Path(dataset).is_dir()


def preflight(cfg: Config, run_dir: Path) -> None:
    """The checks that need no data and no TensorFlow, run before either is loaded, so a
    bad setting fails in seconds: files and folders exist, split strings parse and select
    something, the run folder can be written. Raises UserError or ConfigError."""
    from tlkeras.errors import UserError

    weights = cfg.model.weights
    if weights not in (None, "imagenet"):
        path = Path(weights).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise UserError(
                f"model.weights={weights!r}: no such readable file; give the path to the "
                f"base's notop weights file, 'imagenet' to download, or null for random weights"
            )
    folder = Path(cfg.data.dataset).expanduser()
    if is_folder(cfg.data.dataset) and not folder.is_dir():
        raise UserError(
            f"data.dataset='{cfg.data.dataset}': no such folder ({folder.resolve()}); give a "
            f"folder of class subfolders (<root>/<class>/<image>) or a tfds dataset name"
        )
    if cfg.data.exclude and not Path(cfg.data.exclude).expanduser().is_file():
        raise UserError(
            f"data.exclude='{cfg.data.exclude}': no such file; give a file listing the images to leave "
            f"out (one path per line, or a CSV with a 'path' column such as tlkeras.doctor's flagged.csv)"
        )
    if not is_folder(cfg.data.dataset):
        _check_tfds_name(cfg.data.dataset, cfg.data.data_dir)
    if cfg.runtime.time_budget_minutes and "TF_CONFIG" in os.environ:
        # Each worker would measure its own speed and could plan another recipe or stop
        # at another step, leaving its peers waiting in a collective.
        raise UserError(
            f"runtime.time_budget_minutes={cfg.runtime.time_budget_minutes:g} plans for one machine, not for "
            f"the workers of TF_CONFIG; set runtime.time_budget_minutes=null and give the epochs explicitly"
        )
    if cfg.data.data_dir and not cfg.data.download and not Path(cfg.data.data_dir).expanduser().is_dir():
        raise UserError(
            f"data.data_dir='{cfg.data.data_dir}': no such folder (and data.download=false); give "
            f"a folder holding {cfg.data.dataset}/<version>, or set data.download=true"
        )
    for key in ("train_split", "val_split", "test_split"):
        spec = getattr(cfg.data, key)
        if spec is not None:
            _check_split(f"data.{key}", spec)
    if "TF_CONFIG" in os.environ:
        from tlkeras.policies import tf_config_problem

        problem = tf_config_problem(os.environ["TF_CONFIG"])
        if problem:
            raise UserError(
                f"the TF_CONFIG environment variable {problem}; fix it, or unset it to train on one machine"
            )
    if not _chief_by_tf_config():  # other workers only read the run folder
        return
    existing = next(p for p in (run_dir.resolve(), *run_dir.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK) or (existing == run_dir.resolve() and not existing.is_dir()):
        raise UserError(
            f"run folder '{run_dir}' is not writable ('{existing}' is not a writable folder); pass a writable --run-dir"
        )


def _check_tfds_name(dataset: str, data_dir: str | None) -> None:
    """A mistyped tfds name refused in about 2 s, before TensorFlow loads: tensorflow_datasets
    imports without TensorFlow (its TF imports are lazy) and lists its registered builders
    from its own modules. A namespaced name (huggingface:mnist) and a dataset prepared in
    the data folder under its own name are let through: tfds.builder decides them."""
    import difflib

    from tlkeras.errors import UserError

    name, _, after = dataset.partition(":")
    if after and not after[:1].isdigit():  # namespace:name, not name:version
        return
    folders = [data_dir, os.environ.get("TFDS_DATA_DIR"), "~/tensorflow_datasets"]
    if any(d and (Path(d).expanduser() / name).is_dir() for d in folders):
        return
    import tensorflow_datasets as tfds

    known = tfds.list_builders(with_community_datasets=False)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UserError(
        f"data.dataset={dataset!r} is neither a folder nor a tfds dataset name; {hint}give a folder of "
        f"class subfolders (a path, e.g. ./photos) or a tfds name such as cifar10, tf_flowers"
    )


def _chief_by_tf_config() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (malformed: let the
    strategy say so)."""
    import json

    from tlkeras.policies import is_chief

    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
        task = tf_config.get("task", {})
        return is_chief(task.get("type"), task.get("index"), "chief" in tf_config.get("cluster", {}))
    except (ValueError, AttributeError):
        return True


def _check_split(key: str, spec: str) -> None:
    """Well-formed tfds split syntax that selects at least one example of any split size."""
    from types import SimpleNamespace

    import tensorflow_datasets as tfds

    try:
        instruction = tfds.core.ReadInstruction.from_spec(spec)
        names = {part.split("[")[0] for part in spec.replace(" ", "").split("+")}
        # Any size: only the syntax and slices empty at every size (train[90%:90%]) are refused.
        sizes = {n: SimpleNamespace(num_examples=2**62, shard_lengths=[2**62]) for n in names}
        parts = instruction.to_absolute(sizes)
    except (ValueError, AssertionError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"{key}={spec!r} is not a valid tfds split ({str(e).splitlines()[0]}); "
            f"examples: 'train', 'train[:90%]', 'train[:5000]', 'test[:2000]'"
        ) from None
    if all(p.to is not None and (p.from_ or 0) >= p.to for p in parts):
        raise ConfigError(f"{key}={spec!r} selects no examples; widen the slice, e.g. 'train[90%:]'")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    flat = {}
    for section, value in to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return flat


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}': '{part}' is a value, not a section")
    node[leaf] = value


def _build(cls: type, tree: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            raise ConfigError(f"config key '{dotted}' is now '{RENAMED[dotted]}'; rename it")
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = {} if value is None else value  # an empty `data:` section in YAML
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section; set its keys, e.g. {dotted}.<key>")
            kwargs[key] = _build(kind, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, kind)
    return cls(**kwargs)


def _check_type(key: str, value: Any, kind: Any) -> Any:
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    allowed = typing.get_args(kind) if union else (kind,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if typing.get_origin(t) is Literal and value in typing.get_args(t):
            return value
        # bool is an int in Python, but `epochs: true` is a mistake, not 1.
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:  # YAML 1.1 reads `1e-5` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = " or ".join(
        "null" if t is type(None) else " or ".join(map(repr, typing.get_args(t))) or t.__name__ for t in allowed
    )
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
