"""The measurement folders of docs/recipes.md: CIFAR-10 as renamed class folders, and a
photo folder copied at another size."""

from __future__ import annotations

import numpy as np
from conftest import make_image_folder
from PIL import Image

from tlkeras.config import load_config
from tlkeras.recipe import survey
from tlkeras.recipe_folders import NAMES, main, write_cifar, write_resized


def test_cifar_is_written_as_renamed_class_folders_with_a_test_split(assets, tmp_path):
    import tensorflow_datasets as tfds

    (root,) = write_cifar(tmp_path, str(assets.tfds_dir), per_class=(2,))
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(NAMES)
    assert all(len(list((root / "test" / name).iterdir())) == 100 for name in NAMES)
    data = survey(load_config(None, [f"data.dataset={root}"]).data)
    assert (data.num_test, data.short_side) == (1000, 32)  # test/ is the test split; val is carved
    # the first train image of a class is CIFAR's first image of that class, pixel for pixel
    ds = tfds.load("cifar10", split="train", data_dir=str(assets.tfds_dir), download=False)
    first = next(ex for ex in tfds.as_numpy(ds) if ex["label"] == 3)
    written = np.asarray(Image.open(root / "train" / NAMES[3] / "train_0000.png"))
    np.testing.assert_array_equal(written, first["image"])


def test_a_photo_folder_is_copied_at_another_short_side(tmp_path):
    photos = make_image_folder(tmp_path / "photos", {"train/ants": 3, "val/bees": 2}, size=(50, 36))
    (photos / "train" / "ants" / "broken.jpg").write_bytes(b"not an image")
    root = write_resized(photos, tmp_path / "out", 24)
    copies = sorted(root.rglob("*.jpg"))
    assert len(copies) == 5 and root.name == "photos_24"
    assert {p.relative_to(root).parts[:2] for p in copies} == {("train", "ants"), ("val", "bees")}
    assert {Image.open(p).size for p in copies} == {(33, 24)}


def test_a_missing_photo_folder_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--photos", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err
    assert "--photos" in err and "no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
