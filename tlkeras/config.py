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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlkeras.errors import ConfigError
from tlkeras.policies import VGG16_LAYERS, unfreeze_start


@dataclass
class DataConfig:
    data_dir: str | None = None  # None: tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    download: bool = True  # offline with no local copy, tfds retries for minutes: set false
    train_split: str = "train[:90%]"  # validation is carved from train ...
    val_split: str = "train[90%:]"
    test_split: str = "test"  # ... so the test split only ever gives the final numbers
    batch_size: int = 256  # global: split evenly across replicas
    shuffle_buffer: int = 10_000
    augment: bool = True  # random flip + random translation, train split only
    cache: bool = True  # CIFAR-10 as uint8 is 180 MB: keep it in memory after the first pass


@dataclass
class ModelConfig:
    weights: str | None = "imagenet"  # "imagenet", null (random init) or a path to a .h5 file
    image_size: int = 224  # the 32x32 images are resized to this inside the model
    head_units: int = 256
    dropout: float = 0.5


@dataclass
class HeadConfig:
    """Phase 1: the base is frozen, only the new head trains on its features, computed once."""

    epochs: int = 5
    learning_rate: float = 1e-3
    # With data.augment, also compute the features of the mirrored training images (twice
    # the extraction time): the one augmentation that survives caching.
    mirrored_features: bool = True


@dataclass
class FinetuneConfig:
    """Phase 2: unfreeze and fine-tune at a low rate (0 epochs skips the phase)."""

    epochs: int = 10
    learning_rate: float = 1e-5  # peak, reached after warm-up, then cosine decay to 0
    warmup_epochs: float = 1.0  # protects the freshly trained head from large early updates
    unfreeze: str = "all"  # "all", a block ("block4") or a layer ("block5_conv1") and above


@dataclass
class RuntimeConfig:
    strategy: str = "auto"  # auto | default | mirrored | multi_worker
    # auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with AMX/AVX512-BF16,
    # float32 otherwise; or a Keras policy name.
    mixed_precision: str = "auto"
    jit_compile: bool = False
    steps_per_execution: int = 1


@dataclass
class ExportConfig:
    enabled: bool = True  # SavedModel + ONNX, parity-checked, at the end of training
    name: str = "tlkeras"  # TF Serving's model name: <base>/<name>/<version>/
    base: str | None = None  # None: <run_dir>/export


@dataclass
class Config:
    name: str = "vgg16-cifar10"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


CHOICES = {
    "runtime.strategy": ("auto", "default", "mirrored", "multi_worker"),
    "runtime.mixed_precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
}
POSITIVE = (
    "data.batch_size", "data.shuffle_buffer", "model.image_size", "model.head_units",
    "head.epochs", "head.learning_rate", "finetune.learning_rate",
    "runtime.steps_per_execution",
)  # fmt: skip
NON_NEGATIVE = ("finetune.epochs", "finetune.warmup_epochs")


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
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
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
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be greater than 0")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be 0 or more")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    unfreeze_start(VGG16_LAYERS, cfg.finetune.unfreeze)  # fails now, not after phase 1
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.export.name) or cfg.export.name in ("onnx", ".", ".."):
        raise ConfigError(
            f"export.name={cfg.export.name!r} must be a plain folder name (letters, digits, "
            f"'_', '-', '.') other than 'onnx', e.g. tlkeras"
        )
    if cfg.model.image_size < 32:
        raise ConfigError(f"model.image_size={cfg.model.image_size} must be at least 32")


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
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
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
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
