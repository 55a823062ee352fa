import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from tlkeras.config import DataConfig
from tlkeras.data import augment, feature_dataset, feature_epochs, make_datasets
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
    padded = [np.pad(im, ((4, 4), (4, 4), (0, 0)), mode="reflect") for im in (image.numpy(), image.numpy()[:, ::-1])]
    candidates = [p[dy : dy + 32, dx : dx + 32] for p in padded for dy in range(9) for dx in range(9)]
    seen = set()
    for i in range(20):
        out = augment(image, tf.constant([0, i], tf.int64)).numpy()
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
    epochs = feature_epochs(plain, labels, 16, 0, mirrored)
    mirrored_draws = np.zeros(n)
    for k in range(4):
        batches = list(epochs(k, k + 1))
        f = np.concatenate([f.numpy() for f, _ in batches])
        y = np.concatenate([y.numpy() for _, y in batches])
        assert sorted(y.tolist()) == labels.tolist()  # each example once per epoch
        np.testing.assert_array_equal(np.where(f[:, 0] >= 0, f[:, 0], -f[:, 0] - 1), y)  # its own features
        mirrored_draws[y] += f[:, 0] < 0
    assert 0.3 < mirrored_draws.mean() / 4 < 0.7  # both views, about half each
    assert ((mirrored_draws > 0) & (mirrored_draws < 4)).any()  # an example's view changes between epochs


def test_epochs_depend_on_seed_and_epoch_only(mock_cifar):
    """A resumed run at (epoch 2, batch 1) gets the batches an uninterrupted run gets."""
    splits = make_datasets(DataConfig(batch_size=8, shuffle_buffer=16, augment=True), seed=3)
    whole = [x.numpy() for x, _ in splits.epochs(0, 3)]
    assert len(whole) == 9  # 24 images: 3 batches per epoch
    again = make_datasets(DataConfig(batch_size=8, shuffle_buffer=16, augment=True), seed=3)
    resumed = [x.numpy() for x, _ in again.epochs(2, 3, skip=1)]
    for a, b in zip(whole[7:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole[0], whole[3])  # a new order (and augmentation) each epoch


def test_feature_dataset_without_seed_keeps_order():
    labels = np.arange(10)
    ds = feature_dataset(np.eye(10, dtype=np.float32), labels, 4)
    assert np.concatenate([y.numpy() for _, y in ds]).tolist() == labels.tolist()


def test_failed_download_is_one_readable_error(monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):  # requests' ConnectionError is an OSError, like this one
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(
        UserError, match=r"downloading tfds dataset 'cifar10' failed \(Failed to resolve.*data.download=false"
    ):
        make_datasets(DataConfig(download=True))


# ---------------------------------------------------------------------------- folders

from pathlib import Path  # noqa: E402

from conftest import make_image_folder  # noqa: E402
from PIL import Image  # noqa: E402

from tlkeras import data as D  # noqa: E402
from tlkeras.data import auto_tfds_splits, carve  # noqa: E402
from tlkeras.data import make_datasets as make  # noqa: E402


def labels_of(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def folder_cfg(root, **kw):
    return DataConfig(dataset=str(root), batch_size=8, shuffle_buffer=64, **kw)


def test_flat_folder_classes_carves_and_skips_what_is_not_an_image(tmp_path, caplog):
    root = make_image_folder(tmp_path / "pets", {"cats": 20, "dogs": 10, "emus": 10})
    make_image_folder(root, {"dogs": 3}, fmt="JPEG", seed=1)  # 0.jpg..2.jpg beside the PNGs
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)  # cut short
    (root / "cats" / ".DS_Store").write_bytes(b"\0" * 64)
    (root / "dogs" / "Thumbs.db").write_bytes(b"\0" * 64)
    (root / "emus" / "notes.txt").write_text("not an image")
    splits = make(folder_cfg(root, storage_size=24, val_fraction=0.2, test_fraction=0.1), seed=3)
    info = splits.info
    assert info.source == "folder" and info.class_names == ("cats", "dogs", "emus")
    assert info.storage_size == 24
    # cats 20: 4 val, 2 test; dogs 13: 3 val (2.6), 1 test; emus 10: 2 val, 1 test.
    assert (info.num_val, info.num_test, info.num_train) == (9, 4, 43 - 13)
    assert info.train_class_counts == (14, 9, 7)
    x, y = next(iter(splits.test))
    assert x.dtype == tf.uint8 and x.shape[1:] == (24, 24, 3) and y.dtype == tf.int64
    assert "1 of 44 image files cannot be decoded" in caplog.text and "broken.jpg" in caplog.text
    assert "1 non-image files ignored" in caplog.text
    # Stratified: every class in every split; disjoint; the same seed gives the same split.
    assert sorted(set(labels_of(splits.val))) == [0, 1, 2] and sorted(set(labels_of(splits.test))) == [0, 1, 2]
    again = make(folder_cfg(root, storage_size=24, val_fraction=0.2, test_fraction=0.1), seed=3)
    np.testing.assert_array_equal(
        np.concatenate([x.numpy() for x, _ in again.test]), np.concatenate([x.numpy() for x, _ in splits.test])
    )


def test_folder_images_are_those_files_centre_cropped_to_size(tmp_path):
    root = tmp_path / "d"
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            wide = np.zeros((20, 60, 3), np.uint8)
            wide[:, 20:40] = colour  # the centre third carries the colour
            Image.fromarray(wide).save(root / name / f"{i}.bmp")
        Image.fromarray(np.full((30, 30, 3), colour, np.uint8)).save(root / name / "g.gif")
    splits = make(folder_cfg(root, storage_size=16, val_fraction=0.25, test_fraction=0.25, augment=False))
    x = np.concatenate([x.numpy() for x, _ in splits.train_plain])
    y = labels_of(splits.train_plain)
    assert splits.info.class_names == ("blue", "red")
    channel = np.where(y == 0, 2, 0)  # blue -> channel 2, red -> channel 0
    centre = x[np.arange(len(y)), 8, 8, channel]
    assert (centre > 200).all()  # crop kept the coloured centre, not the black sides


def test_train_and_val_folders_pick_epochs_on_a_carve_and_report_on_val(tmp_path):
    root = make_image_folder(tmp_path / "hym", {"train/ants": 10, "train/bees": 10, "val/ants": 4, "val/bees": 5})
    splits = make(folder_cfg(root, storage_size=16))
    info = splits.info
    assert info.num_test == 9 and info.num_val == 2 and info.num_train == 18
    assert info.splits["test"].startswith("validation folder")
    assert "stratified" in info.splits["val"]


def test_train_val_test_folders_are_used_as_they_are(tmp_path):
    root = make_image_folder(
        tmp_path / "d", {"train/a": 6, "train/b": 6, "validation/a": 2, "validation/b": 3, "test/a": 4, "test/b": 1}
    )
    info = make(folder_cfg(root, storage_size=16)).info
    assert (info.num_train, info.num_val, info.num_test) == (12, 5, 5)


def test_split_strings_slice_split_folders_with_tfds_syntax(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train/a": 10, "train/b": 10, "val/a": 3, "val/b": 3})
    cfg = folder_cfg(root, storage_size=16, train_split="train[:50%]", val_split="train[50%:]", test_split="val")
    splits = make(cfg)
    assert (splits.num_train, splits.num_val, splits.num_test) == (10, 10, 6)
    assert sorted(set(labels_of(splits.train_plain))) == [0, 1]  # a random slice, not class a only
    with pytest.raises(ConfigError, match=r"data.test_split='tset' does not select from this folder's splits"):
        make(folder_cfg(root, storage_size=16, test_split="tset"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: None, "no such folder"),
        (lambda r: (r / "empty").mkdir(parents=True), "holds no class subfolders with images"),
        (lambda r: make_image_folder(r, {"only": 3}), "has one class (only)"),
        (
            lambda r: (make_image_folder(r, {"a": 3}), (r / "b").mkdir(), (r / "b" / "x.png").write_bytes(b"no")),
            "class 'b' in",
        ),
        (
            lambda r: make_image_folder(r, {"train/a": 3, "train/b": 3, "val/a": 2, "val/c": 2}),
            "the class folders of val/ differ from train/ (b, c)",
        ),
        (lambda r: make_image_folder(r, {"train/a": 3, "train/b": 3, "extra/a": 1}), "mixes split folders"),
        (lambda r: make_image_folder(r, {"a": 2, "b": 2}), "the val split of"),
    ],
)
def test_folder_errors_name_the_problem(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    if message == "holds no class subfolders with images":
        root = root / "empty"
    with pytest.raises(UserError) as e:
        make(folder_cfg(root, storage_size=16, val_fraction=0.1, test_fraction=0.1))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_carve_is_stratified_seeded_and_disjoint():
    files = {"a": [Path(f"a{i}") for i in range(10)], "b": [Path(f"b{i}") for i in range(5)]}
    tr, va, te = carve(files, (0.2, 0.2), seed=0)
    assert [len(p) for p in (tr, va, te)] == [9, 3, 3]
    assert {y for _, y in va} == {0, 1} and {y for _, y in te} == {0, 1}
    everything = [p for part in (tr, va, te) for p, _ in part]
    assert len(set(everything)) == 15
    assert carve(files, (0.2, 0.2), seed=0) == (tr, va, te)
    assert carve(files, (0.2, 0.2), seed=1) != (tr, va, te)


# ---------------------------------------------------------------------------- other tfds


@pytest.mark.parametrize(
    "available, explicit, expected",
    [
        (["train", "test"], {}, {"train": "train[:90%]", "val": "train[90%:100%]", "test": "test"}),
        (["train"], {}, {"train": "train[:80%]", "val": "train[80%:90%]", "test": "train[90%:]"}),
        (["train", "validation", "test"], {}, {"train": "train", "val": "validation", "test": "test"}),
        (["train", "validation"], {}, {"train": "train[:90%]", "val": "train[90%:100%]", "test": "validation"}),
        # An explicit val reading 'test' takes it: the reported number comes from a carve instead.
        (
            ["train", "test"],
            {"val": "test[:50%]"},
            {"train": "train[:90%]", "val": "test[:50%]", "test": "train[90%:]"},
        ),
    ],
)
def test_automatic_tfds_splits(available, explicit, expected):
    explicit = {"train": None, "val": None, "test": None, **explicit}
    assert auto_tfds_splits(available, explicit, 0.1, 0.1) == expected


def test_another_tfds_dataset_takes_its_classes_and_size_from_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        splits = make(DataConfig(dataset="tf_flowers", batch_size=4, shuffle_buffer=8), model_size=40)
    assert splits.info.class_names == ("dandelion", "daisy", "tulips", "sunflowers", "roses")
    assert splits.info.storage_size == 40  # variable-size images: the model's size
    x, y = next(iter(splits.train))
    assert x.shape == (4, 40, 40, 3) and x.dtype == tf.uint8 and int(tf.reduce_max(y)) < 5


def test_tfds_datasets_that_are_not_image_classification_are_refused():
    with pytest.raises(UserError, match="'imdb_reviews' has no image feature"):
        make(DataConfig(dataset="imdb_reviews"))
    with pytest.raises(UserError, match="is neither a folder nor a tfds dataset name"):
        make(DataConfig(dataset="no_such_dataset_xyz"))


def test_overlapping_splits_are_named_in_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"a": 10, "b": 10})
    make(folder_cfg(root, storage_size=16, train_split="train", val_split="train[:25%]", test_split="train[90%:]"))
    assert "the train split (train) and the val split (train[:25%]) share 5 examples" in caplog.text
    assert "the train split (train) and the test split (train[90%:]) share 2 examples" in caplog.text


def test_overlapping_tfds_splits_are_named_in_a_warning(assets, caplog):
    cfg = DataConfig(
        data_dir=str(assets.tfds_dir),
        download=False,
        train_split="train[:5000]",
        val_split="train[4000:6000]",
        test_split="test[:100]",
        cache=False,
    )
    make(cfg, model_size=32)
    assert "the train split (train[:5000]) and the val split (train[4000:6000]) share 1000 examples" in caplog.text


def test_split_folder_names_in_any_case_and_only_train_and_test(tmp_path):
    root = make_image_folder(tmp_path / "d", {"Train/a": 8, "Train/b": 8, "TEST/a": 2, "TEST/b": 3})
    info = make(folder_cfg(root, storage_size=16)).info
    # test/ is published, so only val is carved (10% of 8 per class: 1 each).
    assert (info.num_train, info.num_val, info.num_test) == (14, 2, 5)
    assert info.splits["test"] == "test folder"


def test_an_explicit_train_string_reads_what_the_carves_left(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"a": 20, "b": 20})
    splits = make(folder_cfg(root, storage_size=16, train_split="train[:50%]", val_fraction=0.2, test_fraction=0.2))
    assert (splits.num_val, splits.num_test, splits.num_train) == (8, 8, 12)  # half of the 24 left
    assert "share" not in caplog.text  # no overlap with the carves


def test_small_classes_still_give_val_and_test_images():
    from tlkeras.policies import carve_counts

    assert carve_counts(5, 0.1, 0.1) == (1, 1)  # half up, not Python's round(0.5) == 0
    assert carve_counts(15, 0.1, 0.1) == (2, 2)
    assert sum(carve_counts(2, 0.5, 0.5)) == 1  # one always stays in train


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"val/a": 2, "test/a": 2}, "has split folders (test, val/) but no train/"),
        ({"train/a": 2, "val/a": 2, "validation/a": 2}, "has both val/ and validation/; keep one"),
        ({"bus": 3, "car": 3, "train": 3}, "a class named like a split must be renamed"),
    ],
)
def test_ambiguous_layouts_are_refused(tmp_path, layout, message):
    root = make_image_folder(tmp_path / "d", layout)
    with pytest.raises(UserError) as e:
        make(folder_cfg(root, storage_size=16))
    assert message in str(e.value)


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder '.*c' holds no images"):
        make(folder_cfg(root, storage_size=16))


def test_a_carve_of_zero_names_the_fraction(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 5, "b": 5})
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.0 but the val split must be carved"):
        make(folder_cfg(root, storage_size=16, val_fraction=0.0))


def test_a_corrupt_record_file_is_one_line_naming_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tlkeras import data

    paths = [tmp_path / f"cifar10-train.tfrecord-0000{i}-of-00002" for i in range(2)]
    for path in paths:
        with tf.io.TFRecordWriter(str(path)) as writer:
            for i in range(20):
                writer.write(bytes([i]) * 100)
    damaged = bytearray(paths[1].read_bytes())
    damaged[500:520] = b"\xff" * 20  # a flipped stretch inside a record: its checksum fails
    paths[1].write_bytes(bytes(damaged))
    monkeypatch.setattr(data, "_tfds_builder", lambda cfg: SimpleNamespace(data_dir=str(tmp_path)))

    with pytest.raises(UserError) as e:
        with data.read_errors(DataConfig()):
            for _ in tf.data.TFRecordDataset([str(p) for p in paths]):
                pass
    assert str(e.value).startswith(f"'{paths[1]}' is damaged (") and "\n" not in str(e.value)

    paths[0].write_bytes(paths[0].read_bytes()[:-30])  # and one cut short
    assert data.damaged_record_files(DataConfig()) == paths


def test_a_damaged_prepared_shard_is_one_line_naming_the_way_out(tmp_path):
    from conftest import make_image_folder

    from tlkeras.data import read_errors

    root = make_image_folder(tmp_path / "photos", {"a": 6, "b": 6})
    where = tmp_path / "prep"
    cfg = DataConfig(dataset=str(root), batch_size=4, cache=False, prepared_dir=str(where))
    splits = make_datasets(cfg)
    (root / "a" / "0.png").write_bytes(b"not an image any more")  # prepared already: not read again
    for shard in where.glob("*/*.tfrecord"):
        shard.write_bytes(shard.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"a prepared shard of '.*photos' is damaged .*delete the prepared shards"):
        with read_errors(cfg):
            for split in (splits.train_plain, splits.val, splits.test):
                list(split)


# --------------------------------------------------- photo folders as people have them


def photo(path, colour=(200, 80, 40), fmt=None, **options):
    """Writes a 24x32 photo of one colour at `path` (str, bytes or Path) in `fmt` (default: PNG)."""
    pixels = np.clip(np.array(colour) + np.random.default_rng(len(str(path))).normal(0, 10, (24, 32, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").register_heif_opener()
    if fmt == "AVIF":
        from PIL import features

        if not features.check("avif"):
            pytest.skip("this Pillow was built without AVIF")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        image.save(f, fmt or "PNG", **options)
    return path


def data_lines(caplog):
    """The lines naming what the folder listing left out."""
    messages = [r.getMessage() for r in caplog.records if r.name == "tlkeras"]
    preparing = ("data: checking", "data: prepar")  # the preparation's progress and the cache choice
    return [m for m in messages if m.startswith("data: ") and not m.startswith(preparing) and " need " not in m]


def total(info):
    return info.num_train + info.num_val + info.num_test


def small_cfg(root):
    return folder_cfg(root, storage_size=16, val_fraction=0.2, test_fraction=0.2)


def test_nas_trash_and_zip_folders_are_skipped_wherever_they_are_in_one_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, "tlkeras")  # only skipped system folders: said, not warned
    root = tmp_path / "flowers"
    for c in ("daisy", "tulip"):
        for i in range(5):
            photo(root / c / f"{i}.png")
    photo(root / "daisy" / "@eaDir" / "0.png" / "SYNOFILE_THUMB_M.jpg", fmt="JPEG")  # Synology thumbnails
    photo(root / "tulip" / "@eaDir" / "1.png" / "SYNOFILE_THUMB_XL.jpg", fmt="JPEG")
    photo(root / "tulip" / ".thumbnails" / "normal" / "a.png")
    photo(root / "daisy" / "._0.png")  # AppleDouble file beside a photo
    for junk in ("#recycle", ".Trash-1000", "$RECYCLE.BIN", "System Volume Information", "lost+found", "__MACOSX"):
        photo(root / junk / "daisy" / "old.png")  # a class-level system folder: skipped, not a class
    info = make(small_cfg(root)).info
    assert info.class_names == ("daisy", "tulip") and total(info) == 10
    (line,) = data_lines(caplog)
    assert "9 system or hidden folders skipped (#recycle, $RECYCLE.BIN, .Trash-1000, .thumbnails, @eaDir)" in line
    assert "1 hidden or system files skipped" in line
    # Beside and inside split folders too.
    split = make_image_folder(tmp_path / "split", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2})
    photo(split / "@eaDir" / "x.png")
    photo(split / "train" / "#recycle" / "y.png")
    photo(split / "val" / "a" / "@eaDir" / "z.png")
    info = make(folder_cfg(split, storage_size=16, val_fraction=0.25)).info
    assert info.class_names == ("a", "b") and total(info) == 12
    assert D.system_name("@EADIR") and D.system_name(".Trash") and not D.system_name("thumbnails")


def test_links_never_lead_out_of_a_class_folder(tmp_path, caplog):
    root, outside = tmp_path / "flowers", tmp_path / "elsewhere"
    for i in range(4):
        photo(root / "daisy" / f"{i}.png")
        photo(root / "tulip" / f"{i}.png", (40, 80, 200))
    for i in range(2):
        photo(root / "daisy" / "sub" / f"s{i}.png")
    for i in range(3):
        photo(outside / f"{i}.png", (40, 200, 40))
    daisy, tulip = root / "daisy", root / "tulip"
    (daisy / "tulips").symlink_to(tulip, target_is_directory=True)  # another class: would relabel it
    (daisy / "up").symlink_to(root, target_is_directory=True)  # the parent: every class
    (daisy / "extra").symlink_to(outside, target_is_directory=True)  # outside the class folder
    (daisy / "t0.png").symlink_to(tulip / "0.png")  # a file of another class
    (daisy / "again.png").symlink_to(daisy / "0.png")  # a file of the same class: read once
    (daisy / "sub-link").symlink_to(daisy / "sub", target_is_directory=True)  # inside the class: read once
    (daisy / "self").symlink_to(daisy, target_is_directory=True)  # loops
    (daisy / "sub" / "back").symlink_to(daisy, target_is_directory=True)
    (tulip / "loop").symlink_to(tulip / "loop")
    (tulip / "gone.png").symlink_to(tmp_path / "missing.png")  # broken
    (root / "rose").symlink_to(outside, target_is_directory=True)  # a class folder that is a link: fine
    tree, skipped, _ = D.list_folder(root)
    assert {c: len(files) for c, files in tree["train"].items()} == {"daisy": 6, "rose": 3, "tulip": 4}
    assert (len(skipped.outside), len(skipped.loops), len(skipped.broken), skipped.duplicates) == (4, 3, 1, 1)
    info = make(small_cfg(root)).info
    assert total(info) == 13
    (line,) = data_lines(caplog)
    assert "4 links lead out of their class folder" in line and "3 links loop back" in line
    assert "1 links are broken" in line and "1 links to a photo already in the same class read once" in line
    assert "share" not in caplog.text  # no photo in two splits
    # A class folder that is another class through a link would label its photos twice.
    (root / "rose").unlink()
    (root / "rose").symlink_to(tulip, target_is_directory=True)
    with pytest.raises(UserError, match=r"class folder '.*' is \(or lies inside\) class folder .* through a link"):
        D.list_folder(root)


def test_class_folders_that_differ_only_in_case_are_refused_naming_both(tmp_path):
    root = make_image_folder(tmp_path / "flowers", {"Daisy": 3, "daisy": 3, "tulip": 3})
    with pytest.raises(UserError) as caught:
        make(small_cfg(root))
    message = str(caught.value)
    assert "'Daisy' and 'daisy'" in message and "differ only in case" in message
    assert "move the photos of one into the other" in message


def test_images_are_found_by_content_in_any_format_tlkeras_reads(tmp_path, caplog):
    root = tmp_path / "flowers"
    a = root / "a"
    for name in ("1.jfif", "2.jpe", "3.jif", "4", "5.JPG", "6.jpeg.download"):
        photo(a / name, fmt="JPEG")
    photo(a / "7.HEIC", fmt="HEIF")
    photo(a / "8.avif", fmt="AVIF")
    photo(a / "9.jpg", fmt="HEIF")  # an iPhone export: HEIC inside a .jpg
    for i in range(4):
        photo(root / "b" / f"{i}.png", (30, 30, 220))
    photo(root / "b" / "web.webp", fmt="WEBP")  # an image, but not one tlkeras reads: named in the line
    (root / "b" / "notes.txt").write_text("not an image")
    tree, skipped, _ = D.list_folder(root)
    names = "1.jfif 2.jpe 3.jif 4 5.JPG 6.jpeg.download 7.HEIC 8.avif 9.jpg".split()
    assert sorted(p.name for p in tree["train"]["a"]) == names
    assert sorted(p.name for p in skipped.other) == ["notes.txt", "web.webp"]
    info = make(small_cfg(root)).info
    assert total(info) == 13
    (line,) = data_lines(caplog)
    assert "2 non-image files ignored" in line and "cannot be decoded" not in line


def test_names_that_are_not_utf8_are_read_cached_and_shown_escaped(tmp_path, caplog):
    root = os.fsencode(tmp_path / "zip")
    for i in range(4):
        photo(root + b"/caf\xe9/photo-\xe9t\xe9-%d.png" % i)  # Latin-1 names from a Windows zip
        photo(root + b"/tea/%d.png" % i, (30, 30, 220))
    with open(root + b"/tea/cass\xe9.png", "wb") as f:
        f.write(b"broken")
    cfg = small_cfg(os.fsdecode(root))
    for _ in range(2):  # the second run reads the scan from the cache
        splits = make(cfg)
        assert splits.info.class_names == ("caf\\xe9", "tea")
        assert total(splits.info) == 8
        assert sum(len(y) for _, y in splits.train_plain) == splits.info.num_train  # every image decodes
    line = data_lines(caplog)[0]
    assert "1 of 9 image files cannot be decoded" in line and "cass\\xe9.png" in line
    line.encode("utf-8")  # printable, no surrogates


def test_an_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.delenv("TLKERAS_CACHE_DIR")
    from tlkeras.prepare import prepared_root

    home = Path.home() / ".cache" / "tlkeras" / "prepared"
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert prepared_root(None) == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert prepared_root(None) == tmp_path / "tlkeras" / "prepared"


def test_a_folder_mixing_every_kind_trains_on_the_photos_a_person_counts(tmp_path, caplog):
    """NAS and trash folders, links in and out, odd names and formats, a broken file, a
    Latin-1 name, a colour profile: the photos a person sees in daisy/, tulip/ and rose/."""
    from PIL import ImageCms

    root, outside = tmp_path / "photos", tmp_path / "phone"
    daisy, tulip = root / "daisy", root / "tulip"
    for i in range(3):
        photo(daisy / f"{i}.png")
        photo(tulip / f"{i}.png", (40, 80, 200))
        photo(outside / f"IMG_{i}.HEIC", (40, 200, 40), fmt="HEIF")
    photo(daisy / "scan.jfif", fmt="JPEG")
    photo(daisy / "IMG_7.HEIC", fmt="HEIF")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo(daisy / "camera.jpg", fmt="JPEG", icc_profile=srgb)
    photo(os.fsencode(daisy) + b"/d\xe9j\xe0-vu.png")
    photo(tulip / "IMG_9.avif", (40, 80, 200), fmt="AVIF")
    photo(tulip / "download", (40, 80, 200), fmt="JPEG")
    photo(daisy / "@eaDir" / "0.png" / "SYNOFILE_THUMB_M.jpg", fmt="JPEG")
    photo(root / "#recycle" / "old.png")
    photo(root / "__MACOSX" / "daisy" / "._0.png")
    photo(tulip / ".thumbnails" / "t.png")
    (daisy / ".DS_Store").write_bytes(bytes(64))
    (tulip / "Thumbs.db").write_bytes(bytes(64))
    (daisy / "tulips").symlink_to(tulip, target_is_directory=True)
    (tulip / "again.png").symlink_to(tulip / "0.png")
    (tulip / "gone.png").symlink_to(tmp_path / "nothing.png")
    (daisy / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))
    (daisy / "notes.txt").write_text("shot in May")
    (root / "rose").symlink_to(outside, target_is_directory=True)
    info = make(folder_cfg(root, storage_size=16, val_fraction=0.25, test_fraction=0.25)).info
    # daisy: 3 PNG, .jfif, HEIC, camera.jpg, the Latin-1 name = 7; tulip: 3 PNG, AVIF, 'download' = 5;
    # rose: 3 HEIC through the linked class folder. broken.jpg is named in the warning.
    assert info.class_names == ("daisy", "rose", "tulip")
    assert total(info) == 15
    counts = {c: n for c, n in zip(info.class_names, info.train_class_counts)}
    assert counts == {"daisy": 3, "rose": 1, "tulip": 3}  # 7 - 2 - 2, 3 - 1 - 1, 5 - 1 - 1
    (line,) = data_lines(caplog)
    for part in (
        "1 of 16 image files cannot be decoded",
        "broken.jpg",
        "1 non-image files ignored",
        "1 links lead out of their class folder",
        "1 links are broken",
        "1 links to a photo already in the same class read once",
        "4 system or hidden folders skipped",
        "2 hidden or system files skipped",
    ):
        assert part in line, line


def test_split_file_names_follow_the_order_the_plain_splits_yield(tmp_path):
    """The doctor names each feature row by Splits.files: file k must be image k of the
    plain (unshuffled) split, in every role, also with more shards than one reader."""
    import tensorflow as tf

    from tlkeras.images import decode_file, fit_square

    root = make_image_folder(tmp_path / "pets", {"cats": 40, "dogs": 30, "emus": 25})
    splits = make(folder_cfg(root, storage_size=16, val_fraction=0.2, test_fraction=0.2, augment=False), seed=1)
    for role, ds in (("train", splits.train_plain), ("val", splits.val), ("test", splits.test)):
        images = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
        labels = np.concatenate([y for _, y in ds.as_numpy_iterator()])
        names = splits.files[role]
        assert len(names) == len(images)
        for name, image, label in zip(names, images, labels):
            expected = fit_square(tf.constant(decode_file(name)), 16).numpy()
            assert np.array_equal(image, expected), (role, name)
            assert splits.info.class_names[label] == Path(name).parent.name, (role, name)
