"""The folder preparation (decode once into shards), the read path and the cache decision."""

import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_image_folder
from PIL import Image

from tlkeras import prepare as P
from tlkeras.config import DataConfig
from tlkeras.data import list_folder, make_datasets
from tlkeras.errors import UserError
from tlkeras.images import FILE_LIMITS, decode_file, fit_square


def groups_of(root):
    tree, _, _ = list_folder(root)
    return [(split, [p for files in classes.values() for p in files]) for split, classes in tree.items()]


def read_all(prepared, pairs):
    return {int(y): x for x, y in P.read_prepared(prepared, pairs).as_numpy_iterator()}


def odd_folder(root):
    """PNGs plus the odd ones: EXIF-rotated JPEG, RGBA PNG, 16-bit PNG, palette GIF, CMYK JPEG, a broken file."""
    make_image_folder(root, {"a": 3, "b": 3}, size=(37, 23))
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (30, 50, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.fromarray(pixels).save(root / "a" / "rotated.jpg", exif=exif, quality=90)
    rgba = np.dstack([pixels, rng.integers(0, 255, (30, 50), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "a" / "alpha.png")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(root / "b" / "wide.png")
    Image.fromarray(pixels).convert("P").save(root / "b" / "palette.gif")
    Image.fromarray(pixels).convert("CMYK").save(root / "b" / "cmyk.jpg")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_a_prepared_folder_reads_back_as_decode_file_and_fit_square(tmp_path, monkeypatch, workers):
    if workers == 2:  # the process pool, as for a big folder
        monkeypatch.setattr(P, "PROCESS_THRESHOLD", 1)
    root = odd_folder(tmp_path / "d")
    groups = groups_of(root)
    prepared = P.prepare_files(groups, 16, tmp_path / "prep", workers=workers)
    assert list(prepared.bad) == [str(root / "b" / "broken.png")]
    files = [p for _, ps in groups for p in ps if str(p) not in prepared.bad]
    got = read_all(prepared, [(p, i) for i, p in enumerate(files)])
    assert len(got) == len(files) == 11
    for i, p in enumerate(files):  # small images: no DCT scaling, bit-identical
        np.testing.assert_array_equal(got[i], fit_square(decode_file(p, **FILE_LIMITS), 16).numpy(), err_msg=str(p))


def test_a_large_jpeg_is_dct_scaled_within_the_stated_tolerance(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (12, 16, 3), np.uint8)
    big = np.asarray(Image.fromarray(small).resize((1600, 1200), Image.BICUBIC))
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=90)
    assert decode_file(path, draft=P.DRAFT_FACTOR * 64).shape == (150, 200, 3)  # 1/8 scale: 150 >= 2 * 64
    full = fit_square(decode_file(path), 64).numpy().astype(int)
    diff = np.abs(P.decode_square(str(path), 64).astype(int) - full)
    assert diff.max() <= 8 and diff.mean() <= 0.5  # measured on photos: max 3, mean 0.2 (docs/scale.md)


def test_the_key_notices_an_added_removed_or_touched_file(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    where = tmp_path / "prep"
    first = P.prepare_files(groups_of(root), 8, where)
    assert P.prepare_files(groups_of(root), 8, where).folder == first.folder  # reused
    assert P.prepare_files(groups_of(root), 12, where).folder != first.folder  # another S
    seen = {first.folder}
    changes = [
        lambda: make_image_folder(root, {"a": 1}, seed=5) and os.rename(root / "a" / "0.png", root / "a" / "new.png"),
        lambda: (root / "b" / "2.png").unlink(),
        lambda: os.utime(root / "b" / "1.png", ns=(1, 1)),
    ]
    for change in changes:
        change()
        again = P.prepare_files(groups_of(root), 8, where)
        assert again.folder not in seen
        seen.add(again.folder)
    # The stale preparations of the same folder and S are removed; the other S stays.
    assert sorted(p.name for p in where.iterdir()) == sorted(
        [again.folder.name, *[p.name for p in where.iterdir() if P._load(p) and P._load(p).size == 12]]
    )


def test_make_datasets_decodes_each_file_once_over_reruns(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    calls = []
    real = P.decode_for_prepare
    monkeypatch.setattr(P, "decode_for_prepare", lambda p, s: calls.append(p) or real(p, s))
    cfg = DataConfig(dataset=str(root), storage_size=16, batch_size=4, val_fraction=0.25, test_fraction=0.25)
    splits = make_datasets(cfg)
    assert len(calls) == 8
    assert sum(int(tf.shape(y)[0]) for _, y in splits.train_plain) == splits.num_train == 4
    make_datasets(cfg)
    assert len(calls) == 8  # reused
    (root / "a" / "0.png").write_bytes(b"broken")
    info = make_datasets(cfg).info
    assert info.num_train + info.num_val + info.num_test == 7
    assert len(calls) == 16  # the listing changed: prepared again, once


def test_workers_read_disjoint_shard_files_that_cover_the_split(tmp_path):
    """tf.distribute's AUTO sharding (what MultiWorkerMirroredStrategy applies) shards the
    prepared read by FILE: simulated here for 2 workers, each image in a shard of its own."""
    from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

    root = make_image_folder(tmp_path / "d", {"a": 5, "b": 4})
    groups = groups_of(root)
    prepared = P.prepare_files(groups, 8, tmp_path / "prep")
    assert len(prepared.shards) == 9
    pairs = [(p, i) for i, p in enumerate(groups[0][1])]
    ds = P.read_prepared(prepared, pairs).batch(2)
    parts = [{int(y) for _, ys in _AutoShardDataset(ds, 2, w).as_numpy_iterator() for y in ys} for w in range(2)]
    assert parts == [{0, 2, 4, 6, 8}, {1, 3, 5, 7}]  # shard files 0, 2, 4... and 1, 3, 5...


def test_auto_cache_keeps_images_in_memory_only_when_they_fit(caplog):
    caplog.set_level("INFO", "tlkeras")
    gb = 10**9
    assert P.choose_cache("auto", 10_000, 224, available=4 * gb)  # 1.5 GB of 4
    assert not P.choose_cache("auto", 100_000, 224, available=4 * gb)  # 15 GB
    assert "15.1 GB" in caplog.text and "read from disk every epoch" in caplog.text
    assert not P.choose_cache(False, 10, 32, available=4 * gb)
    assert P.choose_cache(True, 10, 32, available=4 * gb)


def test_cache_true_is_refused_up_front_when_it_cannot_fit(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", {"a": 4, "b": 4})
    monkeypatch.setattr(P, "available_memory", lambda: 10_000)
    monkeypatch.setattr(P, "prepare_files", lambda *a, **k: pytest.fail("decoded before the refusal"))
    cfg = DataConfig(dataset=str(root), storage_size=16, cache=True, prepared_dir=str(tmp_path / "prep"))
    with pytest.raises(UserError, match=r"data.cache=true keeps 8 images of 16x16 in memory.*data.cache=auto"):
        make_datasets(cfg)


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    monkeypatch.setattr("tlkeras.errors._free_bytes", lambda path: 1000)
    with pytest.raises(UserError, match="no space left on the device while writing the prepared shards"):
        P.prepare_files(groups_of(root), 8, tmp_path / "prep")


def test_the_prepare_command_prepares_what_train_reads(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", {"a": 2, "b": 2})
    where = tmp_path / "prep"
    args = ["--set", f"data.dataset={root}", "--set", "data.storage_size=8", "--set", f"data.prepared_dir={where}"]
    assert P.main(args) == 0
    assert "4 images prepared in" in capsys.readouterr().out
    assert len(list(where.iterdir())) == 1
