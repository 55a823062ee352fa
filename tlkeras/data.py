"""The input pipeline: tfds CIFAR-10 as raw uint8 images, augmented in tf.data.

    splits = make_datasets(cfg.data, seed=0)
    splits.train  # ((batch, 32, 32, 3) uint8, (batch,) int64), augmented and shuffled

Resizing and VGG16 preprocessing live in the model, so that exports take raw pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tlkeras.config import DataConfig
from tlkeras.errors import ConfigError, UserError

DATASET = "cifar10"
IMAGE_SHAPE = (32, 32, 3)
PAD = 4  # random translation of up to 4 pixels, the usual CIFAR augmentation
LOCAL_COPY = f"a folder holding {DATASET}/3.0.2 (e.g. ../shared/assets/tensorflow_datasets)"


@dataclass
class Splits:
    train: tf.data.Dataset
    train_plain: tf.data.Dataset  # in order, not augmented: for computing features once
    val: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_val: int
    num_test: int


def load_split(cfg: DataConfig, split: str, key: str) -> tf.data.Dataset:
    """One tfds split as (uint8 image, label) pairs, with readable errors."""
    try:
        tfds.core.ReadInstruction.from_spec(split)  # syntax only; names are checked on load
        return tfds.load(
            DATASET, split=split, data_dir=cfg.data_dir, download=cfg.download,
            as_supervised=True, shuffle_files=False,
        )  # fmt: skip
    except AssertionError as e:  # tfds's way of saying the data is not there
        if "could not find data" not in str(e):
            raise
        where = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise UserError(
            f"CIFAR-10 not found in data.data_dir={where!r} and data.download=false; "
            f"set data.download=true (needs network) or data.data_dir to {LOCAL_COPY}"
        ) from None
    except OSError as e:  # requests' ConnectionError and the like, from the download
        if not cfg.download:
            raise
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"downloading CIFAR-10 failed ({reason}); offline, set data.data_dir to "
            f"{LOCAL_COPY} and data.download=false"
        ) from None
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ConfigError(
            f"data.{key}={split!r} is not a valid tfds split ({str(e).splitlines()[0]}); "
            f"examples: 'train', 'train[:90%]', 'train[:5000]', 'test[:2000]'"
        ) from None


def augment(image: tf.Tensor) -> tf.Tensor:
    """Random horizontal flip and translation (reflect-pad, then a random 32x32 crop)."""
    image = tf.image.random_flip_left_right(image)
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]], mode="REFLECT")
    return tf.image.random_crop(padded, IMAGE_SHAPE)


def _count(ds: tf.data.Dataset, key: str, split: str) -> int:
    n = int(ds.cardinality())
    if n <= 0:
        raise ConfigError(f"data.{key}={split!r} selects no examples; widen the split")
    return n


def make_datasets(cfg: DataConfig, seed: int = 0) -> Splits:
    train = load_split(cfg, cfg.train_split, "train_split")
    val = load_split(cfg, cfg.val_split, "val_split")
    test = load_split(cfg, cfg.test_split, "test_split")
    counts = [
        _count(train, "train_split", cfg.train_split),
        _count(val, "val_split", cfg.val_split),
        _count(test, "test_split", cfg.test_split),
    ]
    auto = tf.data.AUTOTUNE
    if cfg.cache:
        train, val, test = train.cache(), val.cache(), test.cache()
    plain = train
    # A new shuffle order every epoch; seeded so a rerun is reproducible.
    train = train.shuffle(min(cfg.shuffle_buffer, counts[0]), seed=seed,
                          reshuffle_each_iteration=True)  # fmt: skip
    if cfg.augment:
        train = train.map(lambda x, y: (augment(x), y), num_parallel_calls=auto)
    batched = [d.batch(cfg.batch_size).prefetch(auto) for d in (train, plain, val, test)]
    return Splits(*batched, *counts)


def feature_dataset(
    features: np.ndarray, labels: np.ndarray, batch_size: int,
    flipped: np.ndarray | None = None, seed: int | None = None,
) -> tf.data.Dataset:  # fmt: skip
    """Cached features as batches; shuffled each epoch when `seed` is given.

    With `flipped` (features of the mirrored images) each example is drawn as either
    view at random: the flip augmentation survives caching, random crops do not.
    """
    parts = (features, labels) if flipped is None else (features, flipped, labels)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if seed is not None:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if flipped is not None:
        # After the shuffle: the draws repeat each epoch but land on other examples.
        ds = ds.map(lambda f, g, y: (tf.where(tf.random.uniform([], seed=seed) < 0.5, f, g), y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
