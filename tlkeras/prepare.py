"""Decode a folder of images once into sharded TFRecord files at the storage size S.

    python -m tlkeras.prepare [--config FILE] --set data.dataset=./photos [--set data.prepared_dir=DIR]

`tlkeras.train`, `evaluate` and `export` prepare on first use and reuse what is there: the
shards are keyed by every file's path, size and modification time, S and PREPARE_VERSION,
so a changed folder is prepared again (and the stale shards removed). Preparing ahead of
time, e.g. on a CPU box before a GPU job, only saves that first pass.

Each image is decoded once, as a viewer shows it (`images.decode_file`: EXIF orientation,
transparency, CMYK, 16-bit), a large JPEG at a reduced DCT scale (`draft`: at least 2 S
pixels on the short side, which keeps the result within 3 levels of a full decode; see
docs/scale.md), then `images.fit_square` to S, in parallel worker processes. Records hold
the raw uint8 pixels (S*S*3 bytes) and the file's index in the folder listing: no decoder
in the read path (tf.io.decode_raw is a copy), at the price of ~1.5x the size of PNG.
"""

from __future__ import annotations

import argparse
import bisect
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tlkeras.config import add_config_arguments
from tlkeras.errors import ArgumentParser, UserError, run_cli, writing
from tlkeras.images import DECODE_VERSION, FILE_LIMITS, ImageError, decode_file

log = logging.getLogger("tlkeras")

PREPARE_VERSION = 1  # bump when decoding or the record layout changes: shards are redone
DRAFT_FACTOR = 2  # JPEGs are DCT-scaled to no less than DRAFT_FACTOR * S on the short side
SHARD_BYTES = 128 * 2**20  # pixels per shard file, about
MIN_SHARDS = 16  # per split folder (fewer for fewer images): workers and readers each get files
PROCESS_THRESHOLD = 256  # fewer images are decoded in threads: starting processes costs seconds


@dataclass(frozen=True)
class Prepared:
    """A prepared folder: shard files, each a contiguous range of `files` (by index)."""

    folder: Path
    size: int
    files: tuple[str, ...]  # index -> path as listed
    shards: tuple[tuple[str, int, int], ...]  # (file name, first index, end index)
    bad: dict  # path -> why it cannot be decoded (left out of the shards)

    def shard_files(self, indices) -> list[str]:
        """The shard paths holding any of `indices`, in order."""
        wanted = sorted(set(indices))
        out = []
        for name, first, end in self.shards:
            lo = bisect.bisect_left(wanted, first)
            if lo < len(wanted) and wanted[lo] < end:
                out.append(str(self.folder / name))
        return out


def cache_root() -> Path:
    """TLKERAS_CACHE_DIR, else $XDG_CACHE_HOME/tlkeras, else ~/.cache/tlkeras; an empty or
    relative XDG_CACHE_HOME is ignored, as the XDG spec says."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = (
        os.environ.get("TLKERAS_CACHE_DIR") or Path(xdg if os.path.isabs(xdg) else Path.home() / ".cache") / "tlkeras"
    )
    return Path(base)


def prepared_root(setting: str | None) -> Path:
    return Path(setting).expanduser() if setting else cache_root() / "prepared"


def folder_key(groups: list[tuple[str, list[Path]]], size: int) -> tuple[str, str]:
    """(folder prefix, key): the prefix names the folder and S (stale preparations of the same
    folder share it), the key adds every file's path, size and mtime, the decode version
    (images.DECODE_VERSION) and PREPARE_VERSION. Paths hash as bytes: names need not be UTF-8."""

    key = hashlib.sha256(f"{DECODE_VERSION}\t{PREPARE_VERSION}\t{size}".encode())
    for group, files in groups:
        for p in files:
            st = p.stat()
            key.update(b"\n%s\t%s\t%d\t%d" % (group.encode(), os.fsencode(p), st.st_size, st.st_mtime_ns))
    roots = sorted({os.fsencode(Path(os.path.commonpath(files)).resolve()) for _, files in groups if files})
    prefix = hashlib.sha256(b"\0".join([*roots, str(size).encode()])).hexdigest()[:12]
    return prefix, key.hexdigest()[:20]


def prepare_files(groups: list[tuple[str, list[Path]]], size: int, where: Path, workers: int | None = None) -> Prepared:
    """Decode every file of `groups` ((name, files) per split folder) once into shards under
    `where`, or reuse them when the key matches; undecodable files are listed in `bad`."""
    prefix, key = folder_key(groups, size)
    final = where / f"{prefix}-{key}"
    found = _load(final)
    if found is None:
        # One preparer per folder and S: a second worker or run on this machine (or on a
        # shared file system) waits here, then reuses the shards instead of decoding again.
        where.mkdir(parents=True, exist_ok=True)
        with open(where / f".{prefix}-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = _load(final) or _prepare(groups, size, where, prefix, key, workers)
        (where / f".{prefix}-{key}.lock").unlink(missing_ok=True)
        return found
    log.info("data: %d images prepared at %dx%d reused from %s", len(found.files), size, size, final)
    return found


def _prepare(groups, size: int, where: Path, prefix: str, key: str, workers: int | None) -> Prepared:
    final = where / f"{prefix}-{key}"
    files, jobs = [], []
    for group, paths in groups:
        first = len(files)
        files += [str(p) for p in paths]
        n = len(paths)
        count = max(min(n, MIN_SHARDS), math.ceil(n * size * size * 3 / SHARD_BYTES))
        bounds = [first + round(i * n / count) for i in range(count + 1)]
        jobs += [(f"{group}-{i:05d}-of-{count:05d}.tfrecord", bounds[i], bounds[i + 1]) for i in range(count)]
    needed = len(files) * size * size * 3
    workers = workers or os.cpu_count() or 1
    use_processes = workers > 1 and len(files) >= PROCESS_THRESHOLD
    log.info(
        "data: preparing %d images at %dx%d into %d shards in %s (once; %s, %d %s)",
        len(files),
        size,
        size,
        len(jobs),
        final,
        f"about {needed / 1e6:.0f} MB",
        workers,
        "processes" if use_processes else "threads",
    )
    start = time.perf_counter()
    tmp = where / f".{prefix}-{key}.{os.getpid()}.tmp"
    bad: dict[str, str] = {}
    with writing(where, "the prepared shards", needed):
        where.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if use_processes:  # spawned, never forked from a process running TensorFlow; no TF in them
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            else:
                pool = ThreadPoolExecutor(max(1, min(workers, 4)))
            with pool:
                decoded = _decoded_in_order(pool, files, size, window=8 * workers)
                _write_shards(tmp, jobs, decoded, size, files, bad)
            manifest = {
                "version": PREPARE_VERSION,
                "size": size,
                "files": files,
                "shards": [list(j) for j in jobs],
                "bad": bad,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest))  # last: it vouches for the shards
            try:
                os.rename(tmp, final)
            except OSError:  # another process prepared the same folder meanwhile: use its shards
                if _load(final) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("data: prepared %d images in %.0f s, %.0f images/s", len(files), seconds, len(files) / max(seconds, 1e-9))
    for stale in where.glob(f"{prefix}-*"):  # the same folder and S before it changed
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return _load(final)


def _load(folder: Path) -> Prepared | None:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if m.get("version") != PREPARE_VERSION or not all((folder / name).exists() for name, _, _ in m["shards"]):
        return None
    shards = tuple((name, lo, end) for name, lo, end in m["shards"])
    return Prepared(folder, m["size"], tuple(m["files"]), shards, m["bad"])


CHUNK = 8  # files per task sent to a worker


def decode_for_prepare(path: str, size: int):
    """decode_file, a large JPEG at a reduced DCT scale (short side >= DRAFT_FACTOR * size):
    uint8 [H, W, 3], or the ImageError's message. Runs in the workers: Pillow, no TensorFlow."""
    try:
        return decode_file(path, **FILE_LIMITS, draft=DRAFT_FACTOR * size)
    except ImageError as e:
        return str(e)


def _decode_chunk(paths: list[str], size: int) -> list:
    return [decode_for_prepare(p, size) for p in paths]


def _decoded_in_order(pool, files: list[str], size: int, window: int):
    """decode_for_prepare of every file, in order, with at most `window` chunks in flight
    (Executor.map would hold every decoded image of a big folder in memory)."""
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    pending = deque()
    for chunk in chunks:
        pending.append(pool.submit(_decode_chunk, chunk, size))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def decode_square(path: str, size: int):
    """uint8 [size, size, 3] as prepared: decode_for_prepare + fit_square (ImageError raised)."""
    from tlkeras.images import fit_square

    pixels = decode_for_prepare(path, size)
    if isinstance(pixels, str):
        raise ImageError(pixels)
    return fit_square(pixels, size).numpy()


def _write_shards(folder: Path, jobs, decoded, size: int, files: list[str], bad: dict) -> None:
    """Every shard file of `jobs`: a tf.train.Example per decodable image (raw pixels at S
    and the file's index); {path: reason} of the others into `bad`.

    fit_square runs in a tf.data map, not in eager calls: under MultiWorkerMirroredStrategy
    an eager function call is registered with the whole cluster (measured: minutes here).
    """
    import tensorflow as tf

    from tlkeras.images import fit_square

    def good():
        for index in range(len(files)):
            pixels = next(decoded)
            if isinstance(pixels, str):
                bad[files[index]] = pixels
            else:
                yield index, pixels

    spec = (tf.TensorSpec([], tf.int64), tf.TensorSpec([None, None, 3], tf.uint8))
    squares = tf.data.Dataset.from_generator(good, output_signature=spec).map(
        lambda i, x: (i, fit_square(x, size)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    shards = iter(jobs)
    name, _, end = -1, 0, 0
    writer = None
    try:
        for index, pixels in squares.prefetch(4).as_numpy_iterator():
            while index >= end:  # the next shard (an empty one if all its files failed)
                if writer is not None:
                    writer.close()
                name, _, end = next(shards)
                writer = tf.io.TFRecordWriter(str(folder / name))
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
                "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        for name, _, _ in shards:  # shards after the last good image: empty files
            tf.io.TFRecordWriter(str(folder / name)).close()
    finally:
        if writer is not None:
            writer.close()


def read_prepared(prepared: Prepared, pairs: list[tuple[Path, int]]):
    """The (image uint8 [S, S, 3], label int64) examples of `pairs` from the shards, in the
    order of `prepared.files` (the shards one after another: callers that name examples,
    such as the doctor, rely on it); parsing in the graph, no Python per image.

    Under MultiWorkerMirroredStrategy tf.data's AUTO sharding finds the file list here and
    gives every worker its own shard files (FILE policy); with fewer shard files than
    workers it falls back to DATA (every worker reads all and keeps its share).
    """
    import numpy as np
    import tensorflow as tf

    position = {p: i for i, p in enumerate(prepared.files)}
    table = np.full(len(prepared.files), -1, np.int64)
    indices = [position[str(p)] for p, _ in pairs]
    table[indices] = [y for _, y in pairs]
    shard_files = prepared.shard_files(indices)
    labels = tf.constant(table)
    size = prepared.size
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "index": tf.io.FixedLenFeature([], tf.int64)}

    def parse(records):
        ex = tf.io.parse_example(records, spec)
        images = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [-1, size, size, 3])
        return images, tf.gather(labels, ex["index"])

    # One shard at a time keeps the files' order; the batched parse below is the parallel part.
    ds = tf.data.Dataset.from_tensor_slices(shard_files).flat_map(tf.data.TFRecordDataset)
    # Parsed in batches of 64 (one op call per 64 records), then unbatched: a fast path.
    ds = ds.batch(64).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = ds.filter(lambda x, y: y >= 0)
    return ds.apply(tf.data.experimental.assert_cardinality(len(pairs)))  # dropped by sharding


# ---------------------------------------------------------------------------- memory

MEMORY_SHARE = 0.5  # data.cache=auto keeps images in RAM when they need at most this share of MemAvailable


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_cache_fits(setting: bool | str, images: int, size: int, available: int | None = None) -> None:
    """data.cache=true refused, before anything is decoded, when `images` at S x S x 3 bytes
    need more than MEMORY_SHARE of the available memory."""
    if setting is not True:
        return
    needed, available = images * size * size * 3, available if available is not None else available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        raise UserError(
            f"data.cache=true keeps {images} images of {size}x{size} in memory, about {_gb(needed)}, but only "
            f"{_gb(available)} is available (at most {MEMORY_SHARE:.0%} is used); set data.cache=auto to read "
            f"them from disk every epoch, or lower data.storage_size"
        )


def choose_cache(setting: bool | str, images: int, size: int, available: int | None = None) -> bool:
    """Whether the decoded splits are kept in RAM: data.cache=true/false as set; auto: when
    `images` at S x S x 3 bytes fit MEMORY_SHARE of the available memory. Logged."""
    check_cache_fits(setting, images, size, available)
    needed, available = images * size * size * 3, available if available is not None else available_memory()
    if setting == "auto":
        keep = available is None or needed <= MEMORY_SHARE * available
        room = "unknown" if available is None else f"{MEMORY_SHARE:.0%} of {_gb(available)} available"
        how = "in memory" if keep else "read from disk every epoch (data.cache=auto)"
        log.info("data: %d images at %dx%d need %s (%s): %s", images, size, size, _gb(needed), room, how)
        return keep
    return bool(setting)


# ---------------------------------------------------------------------------- command


def prepare_config(cfg) -> Prepared:
    """Prepares the folder `cfg.data.dataset` at the storage size that training would use."""
    from tlkeras.config import is_folder
    from tlkeras.data import list_folder
    from tlkeras.policies import storage_size

    if not is_folder(cfg.data.dataset):
        raise UserError(
            f"data.dataset={cfg.data.dataset!r} is not a folder; tfds datasets are sharded records "
            f"already and need no preparing"
        )
    root = Path(cfg.data.dataset).expanduser()
    tree, skipped, _ = list_folder(root)
    groups = [(split, [p for files in classes.values() for p in files]) for split, classes in tree.items()]
    size = storage_size(cfg.data.storage_size, None, cfg.model.resolution)
    prepared = prepare_files(groups, size, prepared_root(cfg.data.prepared_dir))
    level, line = skipped.describe(prepared.bad, len(prepared.files))
    if line:
        log.log(level, "%s", line)
    return prepared


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="python -m tlkeras.prepare", description=__doc__.split("\n")[0])
    add_config_arguments(parser, "data.dataset=./photos")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args: argparse.Namespace = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        from tlkeras.config import load_config
        from tlkeras.console import quiet_libraries

        cfg = load_config(args.config, args.overrides)
        quiet_libraries(args.debug)
        prepared = prepare_config(cfg)
        print(f"{len(prepared.files) - len(prepared.bad)} images prepared in {prepared.folder}")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
