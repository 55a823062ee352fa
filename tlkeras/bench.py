"""Measure on this machine, each figure beside its baseline from the same run.

    python -m tlkeras.bench [--quick] [--run-dir RUN]

Prints one JSON line per figure:
  {"metric": ..., "unit": ..., "ours": ..., "baseline": ..., "ratio": ..., "config": ...}
Fine-tuning: training images/s with the whole base unfrozen, our precision policy
(auto: bfloat16 on CPUs with AMX/AVX512-BF16) against the plain float32 recipe, and the
achieved FLOP/s as a fraction of this machine's matrix-multiply peak measured here.
Inference: onnxruntime (ours) against the TF SavedModel (baseline) at batch 1 and 64, and
an int8 ONNX model (static QDQ quantization, calibrated on CIFAR-10 training images)
against the float32 one, with the test-accuracy change when the run's data is at hand.
With --run-dir the run's exported model is timed; otherwise a freshly built one (latency
does not depend on the weight values). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tlkeras.errors import UserError, run_cli
from tlkeras.export import onnx_session


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def figure(metric: str, unit: str, ours: float, baseline: float, **config) -> dict[str, Any]:
    return {
        "metric": metric, "unit": unit, "ours": round(ours, 4), "baseline": round(baseline, 4),
        "ratio": round(ours / baseline, 3), "config": {**config, "machine": machine()},
    }  # fmt: skip


def bench_inference(savedmodel: Path, onnx_path: Path, quick: bool) -> list[dict[str, Any]]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    session = onnx_session(onnx_path)
    rng = np.random.default_rng(0)
    out = []
    for batch in (1, 64):
        x = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        repeats = (20 if quick else 100) if batch == 1 else (5 if quick else 20)
        tf_x = tf.constant(x)
        base = median_seconds(lambda: serve(images=tf_x)["probabilities"].numpy(), repeats)
        ours = median_seconds(lambda: session.run(["probabilities"], {"images": x}), repeats)
        out.append(figure(
            f"inference_latency_batch{batch}", "ms", ours * 1e3, base * 1e3,
            ours_setup="onnxruntime float32 (CPUExecutionProvider)",
            baseline_setup="TF SavedModel serving_default (eager signature call)",
            batch=batch, repeats=repeats, statistic="median",
        ))  # fmt: skip
    return out


def quantize_int8(onnx_path: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    q.quantize_static(
        str(onnx_path), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True,
    )  # fmt: skip


def bench_int8(onnx_path: Path, workdir: Path, quick: bool, data) -> list[dict[str, Any]]:
    """data: (calibration images, test images, test labels or None)."""
    calibration, images, labels = data
    int8_path = workdir / "model.int8.onnx"
    quantize_int8(onnx_path, int8_path, calibration)
    fp32, int8 = onnx_session(onnx_path), onnx_session(int8_path)
    out = []
    for batch in (1, 64):
        x = images[:batch]
        repeats = (20 if quick else 100) if batch == 1 else (5 if quick else 20)
        base = median_seconds(lambda: fp32.run(["probabilities"], {"images": x}), repeats)
        ours = median_seconds(lambda: int8.run(["probabilities"], {"images": x}), repeats)
        out.append(figure(f"int8_onnx_latency_batch{batch}", "ms", ours * 1e3, base * 1e3,
                          ours_setup="onnxruntime int8 (static QDQ, per-channel)",
                          baseline_setup="onnxruntime float32", batch=batch, repeats=repeats))  # fmt: skip
    if labels is not None:
        def accuracy(session):
            preds = np.concatenate([session.run(["classes"], {"images": images[i:i + 256]})[0]
                                    for i in range(0, len(images), 256)])  # fmt: skip
            return float((preds == labels).mean())

        acc_int8, acc_fp32 = accuracy(int8), accuracy(fp32)
        out.append(figure("int8_onnx_test_accuracy", "accuracy", acc_int8, acc_fp32,
                          test_images=int(len(labels)), change_points=round(100 * (acc_int8 - acc_fp32), 2),
                          calibration_images=int(len(calibration))))  # fmt: skip
    return out


def bench_data(run_dir: Path | None, quick: bool):
    """Calibration and test images (with labels) from the run's CIFAR-10, else random."""
    rng = np.random.default_rng(0)
    if run_dir is not None:
        import dataclasses

        from tlkeras.config import load_config
        from tlkeras.data import load_split

        cfg = dataclasses.replace(load_config(run_dir / "config.yaml").data, download=False)
        n = 1000 if quick else 10000
        try:
            cal = np.stack([x.numpy() for x, _ in load_split(cfg, "train[:256]", "train_split")])
            pairs = [(x.numpy(), y.numpy()) for x, y in load_split(cfg, f"test[:{n}]", "test_split")]
            return cal, np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        except UserError:
            pass
    random = rng.integers(0, 256, (320, 32, 32, 3), dtype=np.uint8)
    return random[:256], random[256:], None


VGG16_MACS_32 = 0.313e9  # multiply-adds per 32x32 image through the conv base


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical peak of this machine."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.matmul(x, x))
    return 2 * n**3 / median_seconds(lambda: matmul(a).numpy(), repeats)


def finetune_images_per_second(precision: str, steps: int, batch: int = 64) -> float:
    import keras

    from tlkeras.config import ModelConfig
    from tlkeras.model import build_model, set_finetune_trainable

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model(ModelConfig(weights=None, image_size=32))
        set_finetune_trainable(model, "all")
        model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, (batch * steps,))
    model.fit(x[: batch * 2], y[: batch * 2], batch_size=batch, verbose=0)  # trace, warm up
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def bench_finetune(quick: bool) -> list[dict[str, Any]]:
    from tlkeras.policies import choose_precision, read_cpu_flags

    ours_precision = choose_precision("auto", 0, read_cpu_flags())
    steps = 10 if quick else 40
    ours = finetune_images_per_second(ours_precision, steps)
    base = finetune_images_per_second("float32", steps)
    flops = ours * 3 * 2 * VGG16_MACS_32  # forward + two backward products, 2 FLOP per MAC
    compute = "bfloat16" if "bfloat16" in ours_precision else "float32"
    peak = matmul_peak(compute)
    return [
        figure("finetune_images_per_second", "images/s", ours, base, ours_setup=ours_precision,
               baseline_setup="float32", unfreeze="all", image_size=32, batch=64, steps=steps),
        figure("finetune_flops_fraction_of_matmul_peak", "fraction", flops / peak, 1.0,
               achieved_gflops=round(flops / 1e9, 1), peak_gflops=round(peak / 1e9, 1),
               peak_dtype=compute, note="baseline 1.0 is the measured matmul peak"),
    ]  # fmt: skip


def forward_images_per_second(precision: str, steps: int, batch: int = 64) -> float:
    """What the frozen-base phase consumes at most: one forward pass per image."""
    import keras

    from tlkeras.config import ModelConfig
    from tlkeras.model import build_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model(ModelConfig(weights=None, image_size=32))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.random.default_rng(0).integers(0, 256, (batch * steps, 32, 32, 3), dtype=np.uint8)
    model.predict(x[: batch * 2], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def bench_pipeline(run_dir: Path | None, quick: bool):
    """The training input pipeline alone (decode, augment, shuffle, batch) vs what the
    fastest-consuming phase (frozen base: forward only) takes: never the bottleneck."""
    if run_dir is None:
        return []
    from tlkeras.policies import choose_precision, read_cpu_flags

    model_images_per_second = forward_images_per_second(
        choose_precision("auto", 0, read_cpu_flags()), 10 if quick else 40
    )
    import dataclasses

    from tlkeras.config import load_config
    from tlkeras.data import make_datasets

    cfg = load_config(run_dir / "config.yaml")
    data = dataclasses.replace(cfg.data, download=False, train_split="train[:5000]" if quick else cfg.data.train_split)
    try:
        splits = make_datasets(data, cfg.seed)
    except UserError:
        return []
    for _ in splits.train:  # first pass fills the cache, as the first epoch does
        pass
    start = time.perf_counter()
    count = sum(int(x.shape[0]) for x, _ in splits.train)
    rate = count / (time.perf_counter() - start)
    return [figure("input_pipeline_images_per_second", "images/s", rate, model_images_per_second,
                   baseline_setup="frozen-base forward images/s (phase 1 consumption)", images=count,
                   note="ratio > 1: the pipeline outpaces the model")]  # fmt: skip


def exported_model(run_dir: Path | None, workdir: Path) -> tuple[Path, Path]:
    if run_dir is not None:
        if not (run_dir / "summary.json").is_file():
            raise UserError(f"'{run_dir}' holds no finished run (no summary.json)")
        summary = json.loads((run_dir / "summary.json").read_text())
        if not summary.get("exports"):
            raise UserError(f"run '{run_dir}' has no export; run python -m tlkeras.export --run-dir {run_dir}")
        last = summary["exports"][-1]
        return Path(last["savedmodel"]), Path(last["onnx"])
    from tlkeras.config import ModelConfig
    from tlkeras.export import export_model
    from tlkeras.model import build_model

    model = build_model(ModelConfig(weights=None, image_size=32))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    record = export_model(model, workdir, "tlkeras", images)
    return Path(record["savedmodel"]), Path(record["onnx"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlkeras.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a few minutes")
    parser.add_argument("--run-dir", type=Path, help="time this run's exported model")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            savedmodel, onnx_path = exported_model(args.run_dir, Path(tmp))
            for line in bench_inference(savedmodel, onnx_path, args.quick):
                print(json.dumps(line), flush=True)
            data = bench_data(args.run_dir, args.quick)
            for line in bench_int8(onnx_path, Path(tmp), args.quick, data):
                print(json.dumps(line), flush=True)
        for line in bench_finetune(args.quick) + bench_pipeline(args.run_dir, args.quick):
            print(json.dumps(line), flush=True)

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
