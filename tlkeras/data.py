"""The input pipeline: any tfds image dataset or a folder of class subfolders, as raw uint8.

    splits = make_datasets(cfg.data, seed=0, model_size=cfg.model.resolution)
    splits.info   # DatasetInfo: class names, storage size S, counts
    splits.train  # ((batch, S, S, 3) uint8, (batch,) int64), augmented and shuffled

`data.dataset` names a tfds dataset (`cifar10`, `tf_flowers`, ...) or a folder laid out as
`<root>/<class>/<image>` or `<root>/{train,val|validation,test}/<class>/<image>`. Every
split yields uint8 images at one storage size S (`images.fit_square`: centre crop, then
resize); resizing to the model's resolution and the base's input transform live in the
model, so exports take raw pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tlkeras.config import AUTO, DataConfig, is_folder
from tlkeras.errors import ConfigError, UserError
from tlkeras.images import (
    FORMAT_NAMES,
    IMAGE_EXTENSIONS,
    ImageError,
    composite_in_graph,
    fit_square,
    shown,
    sniff_file,
)
from tlkeras.policies import assign_splits, auto_batch_size, carve_counts, storage_size
from tlkeras.prepare import check_cache_fits, choose_cache, prepare_files, prepared_root, read_prepared

log = logging.getLogger("tlkeras")

# Folders that operating systems, NAS boxes, zip tools and photo apps write beside photos
# (compared case-blind; any name starting with '.Trash' and every hidden folder too). Never a
# class, never photos of one: Synology's @eaDir holds thumbnails of the photos beside it, so
# read as photos they leak training images into the test split.
SYSTEM_FOLDERS = frozenset(
    name.casefold()
    for name in (
        "@eaDir",  # Synology thumbnails
        "#recycle",  # Synology recycle bin
        "#snapshot",  # Synology snapshots
        "@Recycle",  # QNAP recycle bin
        "@Recently-Snapshot",  # QNAP snapshots
        ".@__thumb",  # QNAP thumbnails
        "@__thumb",
        "$RECYCLE.BIN",  # Windows recycle bin
        "RECYCLER",  # older Windows recycle bin
        "System Volume Information",  # Windows
        "lost+found",  # Linux file systems
        "__MACOSX",  # macOS zip resource forks
        ".Trashes",  # macOS removable drives
        ".Spotlight-V100",
        ".fseventsd",
        ".TemporaryItems",
        ".DocumentRevisions-V100",
        "Network Trash Folder",  # AFP shares
        "Temporary Items",
        ".AppleDouble",  # Netatalk
        ".AppleDB",
        ".thumbnails",  # freedesktop thumbnail cache
        ".thumbs",
        ".picasaoriginals",  # Picasa
    )
)
SYSTEM_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ".picasa.ini")  # besides hidden files
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class DatasetInfo:
    """The one description of the data that the model, export, predict and reports read.

    Written to `<run>/dataset.json` before training; exports carry `class_names` and
    `storage_size`. `storage_size` is S: every split yields uint8
    [S, S, 3] images (the model resizes S to `model.resolution`).
    """

    name: str  # tfds name, or the folder as given in data.dataset
    source: str  # "tfds" | "folder"
    class_names: tuple[str, ...]
    storage_size: int
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    train_class_counts: tuple[int, ...] = ()  # in class_names order
    splits: dict = dataclasses.field(default_factory=dict)  # role -> what it was read from
    # The images data.exclude left out (as the data names them: a folder's paths, or
    # "<split>[index]" for tfds), so the run folder says what it was trained without.
    excluded: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "class_names": list(self.class_names),
            "train_class_counts": list(self.train_class_counts),
            "excluded": list(self.excluded),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {"storage_size": d.get("image_size"), **d}  # run folders written before the rename
        d = {k: v for k, v in d.items() if k in names}
        return cls(
            **{
                **d,
                "class_names": tuple(d["class_names"]),
                "train_class_counts": tuple(d.get("train_class_counts", ())),
                "excluded": tuple(d.get("excluded", ())),
            }
        )


@dataclass
class Splits:
    train: tf.data.Dataset  # the first epoch's batches: shuffled, augmented
    train_plain: tf.data.Dataset  # in order, not augmented: for computing features once
    val: tf.data.Dataset
    test: tf.data.Dataset
    info: DatasetInfo
    epochs: EpochsFn  # epochs(first, end, skip): any epochs' batches, as `seeded_epochs`
    # role -> the name of each example, in the order train_plain, val and test yield them:
    # a folder's file paths, or "<split>[index]" for tfds (empty when tfds knows no sizes).
    files: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return self.info.num_train

    @property
    def num_val(self) -> int:
        return self.info.num_val

    @property
    def num_test(self) -> int:
        return self.info.num_test


# ---------------------------------------------------------------------------- tfds


def _local_copy(name: str) -> str:
    return f"a folder holding {name}/<version> (a tensorflow_datasets folder prepared on a machine with network)"


def load_split(cfg: DataConfig, split: str, key: str) -> tf.data.Dataset:
    """One tfds split as a dataset of feature dicts, with readable errors."""
    name = cfg.dataset
    try:
        tfds.core.ReadInstruction.from_spec(split)  # syntax only; names are checked on load
        return tfds.load(name, split=split, data_dir=cfg.data_dir, download=cfg.download, shuffle_files=False)
    except AssertionError as e:  # tfds's way of saying the data is not there
        if "could not find data" not in str(e):
            raise
        where = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise UserError(
            f"tfds dataset '{name}' not found in data.data_dir={where!r} and data.download=false; "
            f"set data.download=true (needs network) or data.data_dir to {_local_copy(name)}"
        ) from None
    except OSError as e:  # requests' ConnectionError and the like, from the download
        if not cfg.download:
            raise
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"downloading tfds dataset '{name}' failed ({reason}); offline, set data.data_dir "
            f"to {_local_copy(name)} and data.download=false"
        ) from None
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ConfigError(
            f"data.{key}={split!r} is not a valid tfds split ({str(e).splitlines()[0]}); "
            f"examples: 'train', 'train[:90%]', 'train[:5000]', 'test[:2000]'"
        ) from None


def _tfds_builder(cfg: DataConfig):
    try:
        return tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"data.dataset={cfg.dataset!r} is neither a folder nor a tfds dataset name; give a "
            f"folder of class subfolders (a path, e.g. ./photos) or a name such as cifar10, tf_flowers"
        ) from None


def _feature_keys(cfg: DataConfig, features) -> tuple[str, str]:
    """The image feature and the ClassLabel label of a tfds dataset (prefers 'image', 'label')."""

    def find(kind, preferred):
        keys = [k for k, f in features.items() if isinstance(f, kind)]
        return preferred if preferred in keys else (keys[0] if keys else None)

    image, label = find(tfds.features.Image, "image"), find(tfds.features.ClassLabel, "label")
    if image is None or label is None:
        missing = "image feature" if image is None else "ClassLabel label"
        raise UserError(
            f"tfds dataset {cfg.dataset!r} has no {missing} (its features: {', '.join(features)}); "
            f"tlkeras trains image classifiers: pick a dataset with both, e.g. tf_flowers"
        )
    return image, label


def _tfds_split_names(cfg: DataConfig, builder) -> list[str]:
    names = list(builder.info.splits)
    if not names and cfg.download:  # not downloaded yet: tfds.load downloads and prepares it
        load_split(cfg, "train", "train_split")
        names = list(_tfds_builder(cfg).info.splits)
    return names or ["train", "test"]  # split info unavailable (e.g. mocked data)


def _tfds_source(cfg: DataConfig, model_size: int):
    builder = _tfds_builder(cfg)
    image_key, label_key = _feature_keys(cfg, builder.info.features)
    class_names = tuple(builder.info.features[label_key].names)
    height, width, _ = builder.info.features[image_key].shape
    native = height if height is not None and height == width else None
    size = storage_size(cfg.storage_size, native, model_size)

    explicit = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    specs = dict(explicit)
    if None in explicit.values():
        specs = auto_tfds_splits(_tfds_split_names(cfg, builder), explicit, cfg.val_fraction, cfg.test_fraction)

    def to_pairs(example):
        image = example[image_key]
        if image.shape[-1] == 1:  # grayscale datasets (e.g. mnist): the bases want RGB
            image = tf.image.grayscale_to_rgb(image)
        elif image.shape[-1] == 4:  # RGBA: transparency on white, as image files are read
            image = composite_in_graph(image)
        return fit_square(image, size), example[label_key]

    ranges = {}
    if builder.info.splits:  # sizes known: say whether the roles share examples
        for role, spec in specs.items():
            try:
                parts = tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
            except (ValueError, AssertionError, KeyError):
                continue  # reported by the load below, with the key
            ranges[role] = [
                (p.splitname, *slice(p.from_, p.to).indices(builder.info.splits[p.splitname].num_examples)[:2])
                for p in parts
            ]

        def shared(a, b):
            return sum(
                max(0, min(e1, e2) - max(s1, s2)) for n1, s1, e1 in ranges[a] for n2, s2, e2 in ranges[b] if n1 == n2
            )

        warn_overlap(list(ranges), shared, specs)

    # Each example's name, "<split>[index]", when tfds knows the split sizes.
    files = {role: [f"{n}[{i}]" for n, s, e in parts for i in range(s, e)] for role, parts in ranges.items()}
    entries = set(exclude_list(cfg))
    if entries and len(files) < len(specs):
        raise UserError(
            f"data.exclude: tfds does not know the split sizes of {cfg.dataset!r}, so no example can be named"
        )
    datasets, excluded = {}, []
    for role, spec in specs.items():
        ds = load_split(cfg, spec, f"{role}_split").map(to_pairs, num_parallel_calls=tf.data.AUTOTUNE)
        if entries:  # data.exclude: "<split>[index]" entries (tlkeras.doctor's names)
            keep = [name not in entries for name in files[role]]
            excluded += [name for name, k in zip(files[role], keep) if not k]
            files[role] = [name for name, k in zip(files[role], keep) if k]
            ds = _keep(ds, keep)
        datasets[role] = ds
    if entries:
        log.info("data: left out %d examples listed in data.exclude", len(excluded))
    return datasets, class_names, size, specs, None, files, tuple(excluded)


def _keep(ds: tf.data.Dataset, keep: list[bool]) -> tf.data.Dataset:
    """The examples of `ds` whose position is True in `keep`."""
    mask = tf.constant(keep)
    return ds.enumerate().filter(lambda i, _: mask[i]).map(lambda _, example: example)


def auto_tfds_splits(available: list[str], explicit: dict, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split strings for every role: policies.assign_splits, with the carves as the last
    `val_fraction` and `test_fraction` of 'train' in whole percents (tfds slicing)."""
    specs = assign_splits(available, explicit)
    for role, fraction in (("val", val_fraction), ("test", test_fraction)):
        if specs[role] is None and round(100 * fraction) < 1:
            raise ConfigError(
                f"data.{role}_fraction={fraction} carves less than 1% of train for the {role} split "
                f"(tfds slices whole percents); raise it, or set data.{role}_split"
            )
    end = 100
    if specs["test"] is None:
        end -= round(100 * test_fraction)
        specs["test"] = f"train[{end}%:]"
    if specs["val"] is None:
        start = end - round(100 * val_fraction)
        specs["val"], end = f"train[{start}%:{end}%]", start
    if specs["train"] is None:
        specs["train"] = f"train[:{end}%]" if end < 100 else "train"
    return specs


# ---------------------------------------------------------------------------- folders


def system_name(name: str) -> bool:
    """A folder or file name that an OS, a NAS, a zip tool or a photo app writes: never a
    class and never a photo (SYSTEM_FOLDERS, SYSTEM_FILES, '.Trash*')."""
    folded = name.casefold()
    return folded in SYSTEM_FOLDERS or folded in SYSTEM_FILES or folded.startswith(".trash")


def _visible(name: str) -> bool:
    return not name.startswith(".") and not system_name(name)


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class Skipped:
    """What the folder listing left out, for the one log line (`describe`)."""

    system_folders: list[Path] = dataclasses.field(default_factory=list)  # @eaDir, #recycle, hidden folders
    hidden_files: int = 0  # .DS_Store, ._IMG_1.jpg (AppleDouble), Thumbs.db...
    other: list[Path] = dataclasses.field(default_factory=list)  # not an image by name nor content
    outside: list[Path] = dataclasses.field(default_factory=list)  # links out of their class folder
    loops: list[Path] = dataclasses.field(default_factory=list)  # links to a folder that holds them
    broken: list[Path] = dataclasses.field(default_factory=list)  # links to nothing, unreadable folders
    duplicates: int = 0  # links to a photo already listed in the same class: read once

    def describe(self, bad: dict[str, str], total: int) -> tuple[int, str | None]:
        """(log level, one line) naming every kind of file left out with its count, or None."""
        parts = []
        if bad:
            parts.append(
                f"{len(bad)} of {total} image files cannot be decoded and are left out "
                f"(e.g. {', '.join(list(bad.values())[:2])})"
            )
        if self.other:
            parts.append(f"{len(self.other)} non-image files ignored (e.g. '{shown(self.other[0])}')")
        links = [
            (self.outside, "lead out of their class folder (not followed: a link may not add another class's photos)"),
            (self.loops, "loop back to a folder holding them"),
            (self.broken, "are broken or unreadable"),
        ]
        parts += [f"{len(paths)} links {what} (e.g. '{shown(paths[0])}')" for paths, what in links if paths]
        if self.duplicates:
            parts.append(f"{self.duplicates} links to a photo already in the same class read once")
        quiet = []  # expected on NAS and Mac folders: said, but not a warning
        if self.system_folders:
            names = sorted({shown(p.name) for p in self.system_folders})
            quiet.append(f"{len(self.system_folders)} system or hidden folders skipped ({', '.join(names[:5])})")
        if self.hidden_files:
            quiet.append(f"{self.hidden_files} hidden or system files skipped (.DS_Store, Thumbs.db...)")
        if not parts and not quiet:
            return logging.INFO, None
        return (logging.WARNING if parts else logging.INFO), "data: " + "; ".join(parts + quiet)


def _class_files(class_dir: Path, skipped: Skipped) -> list[Path]:
    """The image files under one class folder, recursively, sorted; what is left out is
    counted in `skipped`.

    An image is a file with one of images.IMAGE_EXTENSIONS, or any other file whose first
    bytes are an image format tlkeras reads (images.sniff_file). Never leaves the class
    folder: a link (to a file or a folder) whose target lies outside it - the parent,
    another class, anywhere else - is not followed; a link to a folder holding it (a loop)
    neither; a link inside the class is read once. System and hidden names are skipped.
    """
    top = os.path.realpath(class_dir)
    images, seen_files, seen_dirs = [], set(), {top}
    stack = [(class_dir, top)]  # (path as listed, its real path)
    while stack:
        folder, real = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            skipped.broken.append(folder)
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            if not _visible(entry.name):
                if entry.is_dir():
                    skipped.system_folders.append(path)
                else:
                    skipped.hidden_files += 1
                continue
            if entry.is_symlink():
                try:
                    target = os.path.realpath(path, strict=True)
                except OSError as e:
                    (skipped.loops if e.errno == errno.ELOOP else skipped.broken).append(path)
                    continue
                if not _inside(target, top):
                    skipped.outside.append(path)
                    continue
                if os.path.isdir(target) and _inside(real, target):
                    skipped.loops.append(path)
                    continue
                is_dir, is_file = os.path.isdir(target), os.path.isfile(target)
            else:  # the entry's own type, no stat: a class of thousands of photos lists fast
                target = os.path.join(real, entry.name)
                is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
            if is_dir:
                if target not in seen_dirs:
                    seen_dirs.add(target)
                    subdirs.append((path, target))
            elif not is_file:  # a socket, a fifo
                skipped.other.append(path)
            elif target in seen_files:
                skipped.duplicates += 1
            else:
                seen_files.add(target)
                if path.suffix.lower() in IMAGE_EXTENSIONS or sniff_file(path) is not None:
                    images.append(path)
                else:
                    skipped.other.append(path)
        stack.extend(reversed(subdirs))
    return sorted(images)


def _subfolders(folder: Path, skipped: Skipped) -> list[Path]:
    """The visible subfolders of `folder` (links to folders included), sorted; system and
    hidden ones are counted in `skipped`."""
    found = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        if _visible(p.name):
            found.append(p)
        else:
            skipped.system_folders.append(p)
    return found


def _check_class_folders(folder: Path, class_dirs: list[Path], key: str) -> None:
    """Refuses class folders that differ only in case, or that are one folder twice."""
    by_name = {}
    for p in class_dirs:
        other = by_name.setdefault(p.name.casefold(), p)
        if other is not p:
            raise UserError(
                f"{key}: '{shown(folder)}' has class folders '{shown(other.name)}' and '{shown(p.name)}', which differ "
                f"only in case (one folder on Windows and macOS, two classes here); move the photos of one "
                f"into the other and remove it"
            )
    real = {p: os.path.realpath(p) for p in class_dirs}
    for a in class_dirs:
        for b in class_dirs:
            if a is not b and _inside(real[b], real[a]):
                raise UserError(
                    f"{key}: class folder '{shown(b)}' is (or lies inside) class folder '{shown(a)}' through a "
                    f"link; its photos would carry two labels: replace the link with the photos that belong there"
                )


def list_folder(root: Path, key: str = "data.dataset") -> tuple[dict[str, dict[str, list[Path]]], Skipped, bool]:
    """({split folder name: {class: files}}, what was left out, flat): a flat folder is one
    split named 'train', like tfds's tf_flowers.

    System folders (SYSTEM_FOLDERS: NAS thumbnails and recycle bins, trash, __MACOSX...) and
    hidden ones are skipped wherever they are, as split, class or sub-folders. Class names
    are the folder names as `images.shown` prints them (bytes that are not UTF-8 escaped)."""
    if not root.is_dir():
        raise UserError(
            f"{key}='{shown(root)}': no such folder; give a folder of class subfolders "
            f"(<root>/<class>/<image>) or a tfds dataset name"
        )
    skipped = Skipped()
    subdirs = _subfolders(root, skipped)
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_FOLDERS]
    if split_dirs and len(split_dirs) < len(subdirs):
        others = [shown(p.name) for p in subdirs if p not in split_dirs]
        raise UserError(
            f"{key}='{shown(root)}' mixes split folders ({', '.join(p.name for p in split_dirs)}/) with "
            f"other folders ({', '.join(others[:3])}); use <root>/<split>/<class>/ or "
            f"<root>/<class>/, not both (a class named like a split must be renamed)"
        )
    layout = {}
    for p in split_dirs:  # 'Val', 'validation' and 'val' are one split: 'validation'
        name = SPLIT_FOLDERS[p.name.lower()]
        if name in layout:
            raise UserError(f"{key}='{shown(root)}' has both {layout[name].name}/ and {p.name}/; keep one")
        layout[name] = p
    if split_dirs and "train" not in layout:
        raise UserError(
            f"{key}='{shown(root)}' has split folders ({', '.join(p.name for p in split_dirs)}/) "
            f"but no train/; add train/<class>/<image>"
        )
    layout = layout or {"train": root}
    tree = {}
    for split, folder in layout.items():
        classes = {}
        class_dirs = subdirs if folder is root else _subfolders(folder, skipped)
        _check_class_folders(folder, class_dirs, key)
        for class_dir in class_dirs:
            images = _class_files(class_dir, skipped)
            if not images:
                raise UserError(
                    f"class folder '{shown(class_dir)}' holds no images ({FORMAT_NAMES}); add some or remove the folder"
                )
            classes[shown(class_dir.name)] = images
        if not classes:  # every class folder holds images (checked above)
            raise UserError(
                f"{key}: '{shown(folder)}' holds no class subfolders with images; expected "
                f"{shown(folder)}/<class>/<image> ({FORMAT_NAMES})"
            )
        tree[split] = classes
    if len(tree["train"]) < 2:  # before any image is decoded
        raise UserError(
            f"{key}='{shown(root)}' has one class ({next(iter(tree['train']))}); a classifier needs at least 2 "
            f"class subfolders"
        )
    names = {split: sorted(classes) for split, classes in tree.items()}
    reference = names["train"]
    for split, found in names.items():
        if found != reference:
            extra = sorted(set(found) ^ set(reference))
            raise UserError(
                f"{key}='{shown(root)}': the class folders of {layout[split].name}/ differ from "
                f"{layout['train'].name}/ ({', '.join(extra[:5])}); every split folder needs the same class subfolders"
            )
    return tree, skipped, split_dirs == []


def carve(files_by_class: dict[str, list[Path]], fractions: tuple[float, float], seed: int) -> tuple[list, list, list]:
    """Stratified, seeded split of {class: files} into (train, val, test) lists of (path, class index).

    Each class gives round(n * fraction) files to val and to test (at least one stays in
    train); the draw is a seeded permutation, so the same seed gives the same split.
    """
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for index, (_, files) in enumerate(sorted(files_by_class.items())):
        order = rng.permutation(len(files))
        n_val, n_test = carve_counts(len(files), *fractions)
        picks = (order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test])
        for part, idx in zip(parts, picks):
            part += [(files[i], index) for i in sorted(idx)]
    return parts


def _folder_slice(spec: str, key: str, pools: dict[str, list], seed: int) -> list:
    """A tfds-style split string ('train[:80%]', 'val', 'train[:100]+val') over split folders.

    Each split folder's files are put in a seeded random order first, so a slice is a
    random sample of every class rather than the first classes alphabetically.
    """
    try:
        ri = tfds.core.ReadInstruction.from_spec(spec)
        parts = ri.to_absolute({k: SimpleNamespace(num_examples=len(v)) for k, v in pools.items()})
    except (ValueError, AssertionError) as e:
        raise ConfigError(
            f"data.{key}={spec!r} does not select from this folder's splits "
            f"({', '.join(pools)}): {str(e).splitlines()[0]}"
        ) from None
    out = []
    for p in parts:
        pool = pools[p.splitname]
        order = np.random.default_rng(seed).permutation(len(pool))
        out += [pool[i] for i in sorted(order[p.from_ : p.to])]
    return out


def _folder_source(cfg: DataConfig, model_size: int, seed: int):
    root = Path(cfg.dataset).expanduser()
    tree, skipped, flat = list_folder(root)
    everything = [p for classes in tree.values() for files in classes.values() for p in files]
    size = storage_size(cfg.storage_size, None, model_size)
    check_cache_fits(cfg.cache, len(everything), size)  # before any decoding
    # Decoded once, in parallel, into shards at S (reused while the folder is unchanged); the
    # files that do not decode are found on the way.
    groups = [(split, [p for files in classes.values() for p in files]) for split, classes in tree.items()]
    prepared = prepare_files(groups, size, prepared_root(cfg.prepared_dir))
    bad = prepared.bad
    level, line = skipped.describe(bad, len(everything))
    if line:
        log.log(level, "%s", line)
    class_names = tuple(sorted(next(iter(tree.values()))))
    good = {
        split: {c: [p for p in files if str(p) not in bad] for c, files in classes.items()}
        for split, classes in tree.items()
    }
    for split, classes in good.items():
        for c, files in classes.items():
            if not files and tree[split][c]:
                raise UserError(
                    f"class '{c}' in '{shown(root)}' has no readable images ({len(tree[split][c])} "
                    f"files, none decodes; e.g. {bad[str(tree[split][c][0])]})"
                )
    # Split folders as tfds split names ('val' answers for 'validation').
    pools = {
        split: [(p, class_names.index(c)) for c, files in sorted(classes.items()) for p in files]
        for split, classes in good.items()
    }
    if "validation" in pools:
        pools["val"] = pools["validation"]
    explicit = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    specs = assign_splits(list(good), explicit)
    fractions = (carve_fraction(cfg, "val", specs), carve_fraction(cfg, "test", specs))
    carved = dict(zip(("train", "val", "test"), carve(good["train"], fractions, seed)))
    if any(fractions):  # an explicit train string reads what the carves left
        pools["train"] = carved["train"]
    where = "the folder" if flat else "train/"
    lists, source = {}, {}
    for role, spec in specs.items():
        if spec is not None:
            lists[role] = _folder_slice(spec, f"{role}_split", pools, seed)
            source[role] = spec if explicit[role] is not None else f"{spec} folder"
        elif role == "train":
            lists[role] = carved[role]
            cuts = [f"{r} {f:.0%}" for r, f in zip(("val", "test"), fractions) if f]
            source[role] = where + (f" minus stratified {', '.join(cuts)}" if cuts else "")
        else:
            lists[role] = carved[role]
            source[role] = f"{where}, stratified {fractions[role == 'test']:.0%} (seed {seed})"
    lists, excluded = _leave_out(lists, exclude_list(cfg), root)
    position = {p: i for i, p in enumerate(prepared.files)}  # the order read_prepared yields
    lists = {role: sorted(pairs, key=lambda pair: position[str(pair[0])]) for role, pairs in lists.items()}
    members = {role: {os.path.realpath(p) for p, _ in pairs} for role, pairs in lists.items()}
    warn_overlap(list(members), lambda a, b: len(members[a] & members[b]), source)

    datasets = {}
    for role, pairs in lists.items():
        if not pairs:
            raise UserError(
                f"the {role} split of '{root}' came out empty ({source[role]}); give the folder "
                f"more images per class, or raise data.{role}_fraction"
                if role != "train"
                else f"the train split of '{root}' came out empty; lower data.val_fraction and data.test_fraction"
            )
        datasets[role] = read_prepared(prepared, pairs)
    files = {role: [str(p) for p, _ in pairs] for role, pairs in lists.items()}
    return datasets, class_names, size, source, [y for _, y in lists["train"]], files, excluded


def exclude_list(cfg: DataConfig) -> list[str]:
    """The entries of the data.exclude file: the `path` column of a CSV with a header naming
    one (tlkeras.doctor's flagged.csv), else one path per line ('#' starts a comment)."""
    if not cfg.exclude:
        return []
    path = Path(cfg.exclude).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"data.exclude='{cfg.exclude}' cannot be read ({getattr(e, 'strerror', None) or e}); give a "
            f"text file listing one image path per line, or a flagged.csv written by tlkeras.doctor"
        ) from None
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), [])
    if "path" in header:
        column = header.index("path")
        return [row[column] for row in csv.reader(lines[1:]) if len(row) > column and row[column].strip()]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _leave_out(lists: dict[str, list], entries: list[str], root: Path) -> tuple[dict[str, list], tuple[str, ...]]:
    """`lists` ({role: [(path, label)]}) without the files `entries` name, and the left-out
    paths. Applied after the splits are drawn, so every other image keeps its split and runs
    with and without an exclusion are tested on the same images, less the excluded ones. An
    entry matches as given, relative to the current folder or relative to the data folder."""
    if not entries:
        return lists, ()
    candidates = {
        entry: {os.path.realpath(Path(entry).expanduser()), os.path.realpath(root / entry)} for entry in entries
    }
    wanted = set().union(*candidates.values())
    kept, excluded, present = {}, [], set()
    for role, pairs in lists.items():
        real = [os.path.realpath(p) for p, _ in pairs]
        kept[role] = [pair for pair, r in zip(pairs, real) if r not in wanted]
        excluded += [str(p) for (p, _), r in zip(pairs, real) if r in wanted]
        present.update(real)
    unmatched = sum(1 for c in candidates.values() if not c & present)
    log.info(
        "data: left out %d images listed in data.exclude%s",
        len(excluded),
        f" ({unmatched} entries match no image of the data)" if unmatched > 0 else "",
    )
    return kept, tuple(excluded)


# ---------------------------------------------------------------------------- both


def carve_fraction(cfg: DataConfig, role: str, specs: dict) -> float:
    """The share of train carved for `role` (0 when it reads a split); a carve of 0 is refused."""
    if specs[role] is not None:
        return 0.0
    fraction = getattr(cfg, f"{role}_fraction")
    if fraction <= 0:
        raise ConfigError(
            f"data.{role}_fraction={fraction} but the {role} split must be carved from train "
            f"(no published split is free for it); set data.{role}_fraction above 0 or data.{role}_split"
        )
    return fraction


def warn_overlap(roles: list[str], shared, described: dict[str, str]) -> None:
    """Logs a warning for each pair of splits that share examples (`shared(a, b)` counts
    them): a best epoch picked, or a number reported, on images the model trained on."""
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            count = shared(a, b)
            if count:
                log.warning(
                    "data: the %s split (%s) and the %s split (%s) share %d examples",
                    a,
                    described[a],
                    b,
                    described[b],
                    count,
                )


def augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random horizontal flip and translation: reflect-pad by S/8, then a random S x S crop
    (4 pixels at 32x32, the usual CIFAR augmentation). Stateless: `seed` (shape [2]) alone
    decides the draw, so a resumed run augments as the uninterrupted one would."""
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    pad = image.shape[0] // 8 if image.shape[0] else 4
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(padded, shape, crop_seed)


EpochsFn = Callable[..., tf.data.Dataset]


def seeded_epochs(
    examples: tf.data.Dataset, batch_size: int, seed: int, buffer: int, transform: Callable | None = None
) -> EpochsFn:
    """`epochs(first, end, skip=0)`: the training batches of epochs first..end-1, in one
    dataset, without the first `skip` batches.

    Epoch k's order and random transforms are functions of (seed, k) alone, not of how
    many epochs this process has already run (tf.data's reshuffle_each_iteration starts
    again at the first epoch's order in a new process): a run resumed at epoch k, batch b
    gets the very batches an uninterrupted run gets there. `transform(*example, seed)`
    receives a stateless seed of shape [2], unique per epoch and position.
    """

    def one_epoch(epoch: int) -> tf.data.Dataset:
        epoch_seed = seed * 1_000_003 + epoch  # distinct for every (seed, epoch); fits int64
        ds = examples.shuffle(buffer, seed=epoch_seed)
        if transform is not None:
            pair = lambda i: tf.stack([tf.constant(epoch_seed, tf.int64), i])  # noqa: E731
            ds = ds.enumerate().map(lambda i, ex: transform(*ex, pair(i)), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size)

    def epochs(first: int, end: int, skip: int = 0) -> tf.data.Dataset:
        ds = one_epoch(first)
        for epoch in range(first + 1, end):  # Python ints: a shuffle seed may not be a tensor
            ds = ds.concatenate(one_epoch(epoch))
        return ds.skip(skip).prefetch(tf.data.AUTOTUNE)

    return epochs


def _count(ds: tf.data.Dataset, key: str, split: str | None) -> int:
    n = int(ds.cardinality())
    if n == tf.data.UNKNOWN_CARDINALITY or n == tf.data.INFINITE_CARDINALITY:
        n = int(ds.reduce(0, lambda c, _: c + 1))
    if n <= 0:
        raise ConfigError(f"data.{key}={split!r} selects no examples; widen the split")
    return n


def _sources(cfg: DataConfig, seed: int, model_size: int):
    if is_folder(cfg.dataset):
        return "folder", *_folder_source(cfg, model_size, seed)
    return "tfds", *_tfds_source(cfg, model_size)


def first_test_images(cfg: DataConfig, seed: int, model_size: int, count: int) -> np.ndarray:
    """The first `count` images of the test split, uint8 [count, S, S, 3] (for parity checks)."""
    _, datasets, *_ = _sources(cfg, seed, model_size)
    return np.stack([x for x, _ in datasets["test"].take(count).as_numpy_iterator()])


def make_datasets(cfg: DataConfig, seed: int = 0, model_size: int = 224) -> Splits:
    """Train (shuffled, augmented), plain train, val and test splits, and their DatasetInfo.

    Images: uint8 [batch, S, S, 3]; labels: int64 [batch]. S is `data.storage_size`, else
    the dataset's own square size (32 for CIFAR-10), else `model_size`.
    Raises UserError / ConfigError for a missing dataset or folder, bad split strings,
    a folder with fewer than 2 classes or unreadable classes, and empty splits.
    """
    kind, datasets, class_names, size, source, train_labels, files, excluded = _sources(cfg, seed, model_size)
    train, val, test = datasets["train"], datasets["val"], datasets["test"]
    auto = tf.data.AUTOTUNE
    counts = [_count(d, f"{role}_split", source[role]) for d, role in ((train, "train"), (val, "val"), (test, "test"))]
    if choose_cache(cfg.cache, sum(counts), size):
        train, val, test = train.cache(), val.cache(), test.cache()
    if train_labels is None:  # tfds: one pass, which also fills the cache the first epoch would
        train_labels = np.concatenate([y for _, y in train.batch(4096).as_numpy_iterator()])
    labels = np.asarray(train_labels, np.int64)
    per_class = np.bincount(labels, minlength=len(class_names))
    info = DatasetInfo(
        name=cfg.dataset,
        source=kind,
        class_names=class_names,
        storage_size=size,
        num_train=counts[0],
        num_val=counts[1],
        num_test=counts[2],
        train_class_counts=tuple(int(n) for n in per_class),
        splits=dict(source),
        excluded=excluded,
    )
    transform = (lambda x, y, s: (augment(x, s), y)) if cfg.augment else None
    # "auto" outside a training run (which resolves it first, tlkeras.recipe): from the count.
    batch = auto_batch_size(counts[0])[0] if cfg.batch_size == AUTO else cfg.batch_size
    epochs = seeded_epochs(train, batch, seed, min(cfg.shuffle_buffer, counts[0]), transform)
    batched = [d.batch(batch).prefetch(auto) for d in (train, val, test)]
    return Splits(epochs(0, 1), *batched, info, epochs, files)


def feature_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Cached features as batches, in order (validation)."""
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def feature_epochs(
    features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, flipped: np.ndarray | None = None
) -> EpochsFn:
    """Cached training features as `seeded_epochs`, shuffled every epoch.

    With `flipped` (features of the mirrored images) each example is drawn as either
    view at random: the flip augmentation survives caching, random crops do not.
    """
    if flipped is None:
        return seeded_epochs(tf.data.Dataset.from_tensor_slices((features, labels)), batch_size, seed, len(labels))
    views = tf.data.Dataset.from_tensor_slices((features, flipped, labels))
    pick = lambda f, g, y, s: (tf.where(tf.random.stateless_uniform([], s) < 0.5, f, g), y)  # noqa: E731
    return seeded_epochs(views, batch_size, seed, len(labels), pick)


def damaged_record_files(cfg: DataConfig) -> list[Path]:
    """The tfds record files of `cfg.dataset` that do not read to the end (corrupt or
    truncated), each read on its own: TensorFlow's DataLossError names no file."""
    folder = Path(_tfds_builder(cfg).data_dir)
    bad = []
    for path in sorted(folder.glob("*.tfrecord*")):
        try:
            tf.data.TFRecordDataset(str(path)).reduce(0, lambda n, _: n + 1)
        except tf.errors.DataLossError:
            bad.append(path)
    return bad


@contextmanager
def read_errors(cfg: DataConfig) -> Iterator[None]:
    """Damaged data met while training reads it, as one UserError line naming the file:
    a tfds record file that is corrupt or cut short (tf.errors.DataLossError), or an image
    of a folder that became unreadable after the scan (ImageError inside tf.data)."""
    try:
        yield
    except tf.errors.DataLossError as e:
        reason = e.message.splitlines()[0].split("}}")[-1].strip()[:120]
        if is_folder(cfg.dataset):  # the prepared shards: made again from the folder
            raise UserError(
                f"a prepared shard of '{cfg.dataset}' is damaged ({reason}); delete the prepared shards in "
                f"'{prepared_root(cfg.prepared_dir)}' and rerun: the folder is prepared again"
            ) from None
        bad = damaged_record_files(cfg)
        where = ", ".join(f"'{p}'" for p in bad[:3]) or f"a data file of '{cfg.dataset}'"
        raise UserError(
            f"{where} is damaged ({reason}); restore it from a good copy, or delete the "
            f"dataset's folder and let tfds prepare it again (data.download=true)"
        ) from None
    except (tf.errors.UnknownError, tf.errors.InvalidArgumentError) as e:
        found = re.search(r"ImageError: (.+)", e.message)
        if found is None:
            raise
        raise ImageError(f"{found.group(1).strip()} (it was readable when the folder was scanned)") from None
