"""Measure the folder input path: prepare once + read shards, against the previous path and the model.

    python -m tlkeras.bench_input [--phone 200] [--small 2000] [--workdir /tmp/tlkeras-bench-input]

Makes two folders of JPEGs (quality 90) from the hymenoptera photos in the shared assets
(or --photos DIR): crops/upscales at phone size (4032x3024) and at 500x375. For each, in one
process and the same run, prints one JSON line per figure with the ratio to its baseline:
- prepare: images/s of `prepare.prepare_files` (one decode, DCT-scaled, worker processes)
  against the previous first pass (the scan's threaded full decode, then the per-image
  `tf.numpy_function` read, as 1 / (1/scan + 1/read));
- read: images/s of one pass over the prepared shards against the previous per-image read
  (a full Pillow decode + fit_square every epoch, cache off) and against the frozen
  MobileNetV2 forward at 224 px (random weights: the speed does not depend on them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tlkeras.errors import ArgumentParser, UserError, run_cli

S = 224


def make_folder(photos: list[Path], root: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` JPEGs of `size` in root/{class}/: random crops of the photos, resized (upscaled)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        src = photos[i % len(photos)]
        path = root / src.parent.name / f"{i:05d}.jpg"
        out.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.7, 1))
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            im.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(path, quality=90)
    return out


def old_read_rate(files: list[Path]) -> float:
    """The previous read path: a tf.numpy_function Pillow decode + fit_square per image."""
    import tensorflow as tf

    from tlkeras.images import FILE_LIMITS, decode_file, fit_square

    def read(path):
        image = tf.numpy_function(lambda p: decode_file(p.decode(), **FILE_LIMITS), [path], tf.uint8, stateful=False)
        image.set_shape([None, None, 3])
        return fit_square(image, S)

    ds = tf.data.Dataset.from_tensor_slices([str(p) for p in files]).map(read, num_parallel_calls=tf.data.AUTOTUNE)
    return _rate(ds.batch(32).prefetch(tf.data.AUTOTUNE), len(files))


def old_scan_rate(files: list[Path]) -> float:
    """The previous scan: every file decoded in full in threads (its result discarded)."""
    from tlkeras.images import FILE_LIMITS, decode_file

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        list(pool.map(lambda p: decode_file(p, **FILE_LIMITS).shape, files))
    return len(files) / (time.perf_counter() - start)


def _rate(ds, n: int) -> float:
    start = time.perf_counter()
    seen = sum(int((x[0] if isinstance(x, tuple) else x).shape[0]) for x in ds)
    assert seen == n, (seen, n)
    return n / (time.perf_counter() - start)


def forward_rate(batches: int = 6, batch: int = 32) -> float:
    """Frozen MobileNetV2 at 224 px, uint8 in, pooled features out (phase 1's pass)."""
    import keras
    import numpy as np
    import tensorflow as tf

    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg")
    forward = tf.function(lambda x: base(keras.applications.mobilenet_v2.preprocess_input(tf.cast(x, tf.float32))))
    x = tf.constant(np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), np.uint8))
    forward(x)
    start = time.perf_counter()
    for _ in range(batches):
        forward(x).numpy()
    return batches * batch / (time.perf_counter() - start)


def figure(metric: str, ours: float, baseline: float, **config) -> dict:
    return {
        "metric": metric,
        "unit": "images/s",
        "ours": round(ours, 1),
        "baseline": round(baseline, 1),
        "ratio": round(ours / baseline, 2),
        "config": config,
    }


def measure(photos: list[Path], workdir: Path, name: str, count: int, size: tuple[int, int], forward: float):
    from tlkeras.prepare import prepare_files, read_prepared

    files = make_folder(photos, workdir / name, count, size)
    where = workdir / f"prepared-{name}"
    shutil.rmtree(where, ignore_errors=True)
    start = time.perf_counter()
    prepared = prepare_files([("train", files)], S, where)
    prepare = count / (time.perf_counter() - start)
    scan, old = old_scan_rate(files), old_read_rate(files)
    old_first = 1 / (1 / scan + 1 / old)
    pairs = [(p, 0) for p in files]
    read_prepared(prepared, pairs).batch(32).take(1).get_single_element()  # warm the graph, not the files
    new_read = _rate(read_prepared(prepared, pairs).batch(32).prefetch(-1), count)
    conf = {"images": count, "photo": f"{size[0]}x{size[1]}", "S": S, "cores": os.cpu_count()}
    return [
        figure("prepare (one decode) vs previous first pass (scan + read)", prepare, old_first, **conf),
        figure("read prepared shards vs previous per-image read", new_read, old, **conf),
        figure("read prepared shards vs MobileNetV2 224 forward", new_read, forward, **conf),
        figure("prepare vs MobileNetV2 224 forward", prepare, forward, **conf),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="python -m tlkeras.bench_input", description=__doc__.split("\n")[0])
    parser.add_argument("--phone", type=int, default=200, help="phone-size (4032x3024) JPEGs to make")
    parser.add_argument("--small", type=int, default=2000, help="500x375 JPEGs to make")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tlkeras-bench-input")
    default_photos = Path(__file__).resolve().parents[2] / "shared" / "assets" / "hymenoptera_data"
    parser.add_argument("--photos", type=Path, default=default_photos, help="a folder of JPEG photos")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        from tlkeras.console import quiet_libraries

        photos = sorted(args.photos.rglob("*.jpg"))
        if not photos:
            raise UserError(f"--photos '{args.photos}' holds no .jpg photos; give a folder of JPEGs")
        quiet_libraries(args.debug)
        forward = forward_rate()
        print(json.dumps({"metric": "MobileNetV2 224 forward", "unit": "images/s", "ours": round(forward, 1)}))
        for name, count, size in (("phone", args.phone, (4032, 3024)), ("small", args.small, (500, 375))):
            if count:
                for line in measure(photos, args.workdir, name, count, size, forward):
                    print(json.dumps(line), flush=True)

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
