import numpy as np
import pytest
import tensorflow as tf

from tlkeras.config import DataConfig
from tlkeras.data import augment, feature_dataset, make_datasets
from tlkeras.errors import ConfigError, UserError


def test_batches_are_raw_uint8_with_int_labels(mock_cifar):
    splits = make_datasets(DataConfig(batch_size=8, shuffle_buffer=16))
    assert (splits.num_train, splits.num_val, splits.num_test) == (24, 24, 24)
    for ds in (splits.train, splits.val, splits.test):
        x, y = next(iter(ds))
        assert x.dtype == tf.uint8 and x.shape == (8, 32, 32, 3)
        assert y.dtype == tf.int64 and y.shape == (8,)
    assert sum(int(tf.shape(y)[0]) for _, y in splits.train) == 24  # partial batch kept


def test_eval_splits_are_not_augmented_or_shuffled(mock_cifar):
    splits = make_datasets(DataConfig(batch_size=8, shuffle_buffer=16))
    a = np.concatenate([x.numpy() for x, _ in splits.test])
    b = np.concatenate([x.numpy() for x, _ in splits.test])
    np.testing.assert_array_equal(a, b)


def test_train_split_is_augmented(mock_cifar):
    plain = make_datasets(DataConfig(batch_size=24, shuffle_buffer=1, augment=False, cache=False))
    aug = make_datasets(DataConfig(batch_size=24, shuffle_buffer=1, augment=True, cache=False))
    x_plain = next(iter(plain.train))[0].numpy()
    x_aug = next(iter(aug.train))[0].numpy()
    assert x_aug.dtype == np.uint8
    assert not np.array_equal(x_plain, x_aug)


def test_augment_is_a_flip_and_shift_of_the_same_pixels():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    padded = [np.pad(im, ((4, 4), (4, 4), (0, 0)), mode="reflect")
              for im in (image.numpy(), image.numpy()[:, ::-1])]  # fmt: skip
    candidates = [p[dy:dy + 32, dx:dx + 32] for p in padded for dy in range(9) for dx in range(9)]
    seen = set()
    for _ in range(20):
        out = augment(image).numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        matches = [i for i, c in enumerate(candidates) if np.array_equal(out, c)]
        assert matches, "output is not a flipped/shifted copy of the input"
        seen.add(matches[0])
    assert len(seen) > 1  # random, not a fixed transform


def test_missing_data_with_download_off_says_where_and_how(tmp_path):
    with pytest.raises(UserError) as e:
        make_datasets(DataConfig(data_dir=str(tmp_path), download=False))
    msg = str(e.value)
    assert str(tmp_path) in msg and "data.download=true" in msg and "data.data_dir" in msg


def test_malformed_split_is_a_config_error(mock_cifar):
    with pytest.raises(ConfigError, match=r"data.val_split='train\[:10%' is not a valid tfds split"):
        make_datasets(DataConfig(val_split="train[:10%"))


def test_unknown_split_name_is_a_config_error(assets):
    cfg = DataConfig(data_dir=str(assets.tfds_dir), download=False, train_split="trian[:10%]")
    with pytest.raises(ConfigError, match=r"data.train_split='trian\[:10%\]' .*Unknown split 'trian'"):
        make_datasets(cfg)


def test_real_cifar10_counts(assets):
    cfg = DataConfig(data_dir=str(assets.tfds_dir), download=False, batch_size=500)
    splits = make_datasets(cfg)
    assert (splits.num_train, splits.num_val, splits.num_test) == (45_000, 5_000, 10_000)


def test_plain_train_view_is_in_order_and_not_augmented(mock_cifar):
    splits = make_datasets(DataConfig(batch_size=8, shuffle_buffer=16, augment=True))
    a = np.concatenate([x.numpy() for x, _ in splits.train_plain])
    b = np.concatenate([x.numpy() for x, _ in splits.train_plain])
    np.testing.assert_array_equal(a, b)
    assert len(a) == splits.num_train


def test_feature_dataset_draws_either_view_and_every_example_once_per_epoch():
    n = 64
    labels = np.arange(n)
    plain = np.zeros((n, 4), np.float32) + labels[:, None]
    mirrored = -plain - 1  # tells the views apart: >= 0 plain, < 0 mirrored
    ds = feature_dataset(plain, labels, 16, mirrored, seed=0)
    mirrored_draws = np.zeros(n)
    for _ in range(4):
        batches = list(ds)
        f = np.concatenate([f.numpy() for f, _ in batches])
        y = np.concatenate([y.numpy() for _, y in batches])
        assert sorted(y.tolist()) == labels.tolist()  # each example once per epoch
        np.testing.assert_array_equal(np.where(f[:, 0] >= 0, f[:, 0], -f[:, 0] - 1), y)  # its own features
        mirrored_draws[y] += f[:, 0] < 0
    assert 0.3 < mirrored_draws.mean() / 4 < 0.7  # both views, about half each
    assert ((mirrored_draws > 0) & (mirrored_draws < 4)).any()  # an example's view changes between epochs


def test_feature_dataset_without_seed_keeps_order():
    labels = np.arange(10)
    ds = feature_dataset(np.eye(10, dtype=np.float32), labels, 4)
    assert np.concatenate([y.numpy() for _, y in ds]).tolist() == labels.tolist()


def test_failed_download_is_one_readable_error(monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):  # requests' ConnectionError is an OSError, like this one
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(UserError, match=r"downloading CIFAR-10 failed \(Failed to resolve.*data.download=false"):
        make_datasets(DataConfig(download=True))
