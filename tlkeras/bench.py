"""Measure on this machine, each figure beside its baseline from the same run.

    python -m tlkeras.bench [--quick] [--run-dir RUN | --backbone mobilenet_v2 --resolution 128]

Prints one JSON line per figure:
  {"metric": ..., "unit": ..., "ours": ..., "baseline": ..., "ratio": ..., "config": ...}
Phase 1: head training on features computed once (ours) against the keras.io guide's
recipe (the frozen base recomputed every epoch, float32), wall time and val accuracy.
Fine-tuning: training images/s at the run's resolution and unfreeze setting, our
precision policy (auto: bfloat16 on CPUs with AMX/AVX512-BF16) against plain float32, and
the achieved FLOP/s as a fraction of this machine's matrix-multiply peak measured here.
Inference: onnxruntime (ours) against the TF SavedModel (baseline) at batch 1 and 64, and
an int8 ONNX model (static QDQ quantization, calibrated on CIFAR-10 training images)
against the float32 one, with the test-accuracy change when the run's data is at hand.
onnxruntime's batch-1 FLOP/s is also set against the float32 matmul peak: the headroom
any float32 runtime has left. LiteRT (the run's .tflite exports, float32 and int8): batch-1
latency and file size beside ONNX's.
Adversarial fine-tuning (with --run-dir): FGSM-RS images/s against standard fine-tuning,
and the seconds of its PGD guard per epoch.
MobileNetV2 adds the FLOP/s of a depthwise convolution against a pointwise one: what
limits the depthwise separable blocks on a CPU.
With --run-dir (a CIFAR-10 run of either base) the run's exported model is timed;
otherwise a freshly built one (--backbone, --resolution; latency does not depend on the
weight values). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.console import quiet_libraries
from tlkeras.errors import ArgumentParser, UserError, run_cli
from tlkeras.export import onnx_session
from tlkeras.litert import quantize_onnx


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
        "metric": metric,
        "unit": unit,
        "ours": round(ours, 4),
        "baseline": round(baseline, 4),
        "ratio": round(ours / baseline, 3),
        "config": {**config, "machine": machine()},
    }


def bench_inference(savedmodel: Path, onnx_path: Path, quick: bool, mcfg) -> list[dict[str, Any]]:
    """Latency of both exports; and onnxruntime's batch-1 FLOP/s against the float32 peak,
    which shows how much room any float32 runtime has left on this machine."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    session = onnx_session(onnx_path)
    rng = np.random.default_rng(0)
    out = []
    for batch in (1, 64):
        x = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        repeats = (20 if quick else 100) if batch == 1 else (5 if quick else 20)
        tf_x = tf.constant(x)
        base = median_seconds(lambda tf_x=tf_x: serve(images=tf_x)["probabilities"].numpy(), repeats)
        ours = median_seconds(lambda x=x: session.run(["probabilities"], {"images": x}), repeats)
        out.append(
            figure(
                f"inference_latency_batch{batch}",
                "ms",
                ours * 1e3,
                base * 1e3,
                ours_setup="onnxruntime float32 (CPUExecutionProvider)",
                baseline_setup="TF SavedModel serving_default (eager signature call)",
                batch=batch,
                repeats=repeats,
                statistic="median",
            )
        )
        if batch == 1:
            flops = 2 * conv_macs(_model("float32", mcfg))[0] / ours
            peak = matmul_peak("float32")
            out.append(
                figure(
                    "onnx_batch1_flops_fraction_of_float32_peak",
                    "fraction",
                    flops / peak,
                    1.0,
                    achieved_gflops=round(flops / 1e9, 1),
                    peak_gflops=round(peak / 1e9, 1),
                    backbone=mcfg.backbone,
                    resolution=mcfg.resolution,
                    note="baseline 1.0 is the measured float32 matmul peak",
                )
            )
    return out


def bench_int8(onnx_path: Path, workdir: Path, quick: bool, data) -> list[dict[str, Any]]:
    """data: (calibration images, test images, test labels or None)."""
    calibration, images, labels = data
    int8_path = workdir / "model.int8.onnx"
    quantize_onnx(onnx_path, int8_path, calibration)
    fp32, int8 = onnx_session(onnx_path), onnx_session(int8_path)
    out = []
    for batch in (1, 64):
        x = images[:batch]
        repeats = (20 if quick else 100) if batch == 1 else (5 if quick else 20)
        base = median_seconds(lambda x=x: fp32.run(["probabilities"], {"images": x}), repeats)
        ours = median_seconds(lambda x=x: int8.run(["probabilities"], {"images": x}), repeats)
        out.append(
            figure(
                f"int8_onnx_latency_batch{batch}",
                "ms",
                ours * 1e3,
                base * 1e3,
                ours_setup="onnxruntime int8 (static QDQ, per-channel)",
                baseline_setup="onnxruntime float32",
                batch=batch,
                repeats=repeats,
            )
        )
    if labels is not None:

        def accuracy(session):
            preds = np.concatenate(
                [session.run(["classes"], {"images": images[i : i + 256]})[0] for i in range(0, len(images), 256)]
            )
            return float((preds == labels).mean())

        acc_int8, acc_fp32 = accuracy(int8), accuracy(fp32)
        out.append(
            figure(
                "int8_onnx_test_accuracy",
                "accuracy",
                acc_int8,
                acc_fp32,
                test_images=int(len(labels)),
                change_points=round(100 * (acc_int8 - acc_fp32), 2),
                calibration_images=int(len(calibration)),
            )
        )
    return out


def bench_litert(record: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """Batch-1 latency and file size of the LiteRT exports (float32 against the float32 ONNX
    model, int8 against float32 LiteRT), and of int8 ONNX's file against float32 ONNX's."""
    from tlkeras.litert import runner

    if not record.get("litert"):
        return []
    size = record["image_size"]
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    repeats = 20 if quick else 100
    session = onnx_session(record["onnx"])
    times = {"onnx": median_seconds(lambda: session.run(["probabilities"], {"images": x}), repeats)}
    for key in ("litert", "litert_int8"):
        if record.get(key):
            run = runner(record[key])
            times[key] = median_seconds(lambda run=run: run(x), repeats)
    out = [
        figure(
            "litert_latency_batch1",
            "ms",
            times["litert"] * 1e3,
            times["onnx"] * 1e3,
            ours_setup="ai-edge-litert float32 (XNNPACK, all cores)",
            baseline_setup="onnxruntime float32",
            repeats=repeats,
        ),
        figure("litert_file_size", "MB", record["litert_bytes"] / 1e6, record["onnx_bytes"] / 1e6, baseline="ONNX"),
    ]
    if "litert_int8" in times:
        out.append(
            figure(
                "int8_litert_latency_batch1",
                "ms",
                times["litert_int8"] * 1e3,
                times["litert"] * 1e3,
                ours_setup="ai-edge-litert full-integer int8",
                baseline_setup="ai-edge-litert float32",
                repeats=repeats,
            )
        )
    for key, float_bytes in (("litert_int8", record["litert_bytes"]), ("onnx_int8", record["onnx_bytes"])):
        if record.get(key):
            out.append(figure(f"{key}_file_size", "MB", Path(record[key]).stat().st_size / 1e6, float_bytes / 1e6))
    return out


def bench_data(run_dir: Path | None, quick: bool):
    """Calibration and test images (with labels) from the run's CIFAR-10, else random."""
    rng = np.random.default_rng(0)
    if run_dir is not None:
        import dataclasses

        from tlkeras import rundir
        from tlkeras.data import load_split

        cfg = dataclasses.replace(rundir.load_run_config(run_dir).data, download=False)
        n = 1000 if quick else 10000
        try:
            cal = np.stack([e["image"].numpy() for e in load_split(cfg, "train[:256]", "train_split")])
            pairs = [(e["image"].numpy(), e["label"].numpy()) for e in load_split(cfg, f"test[:{n}]", "test_split")]
            return cal, np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        except UserError:
            pass
    random = rng.integers(0, 256, (320, 32, 32, 3), dtype=np.uint8)
    return random[:256], random[256:], None


def cifar10_info():
    """The benchmark's data: CIFAR-10's shape (names do not matter to a timing)."""
    from tlkeras.data import DatasetInfo

    return DatasetInfo(
        name="cifar10", source="tfds", storage_size=32, class_names=tuple(f"class_{i}" for i in range(10))
    )


def conv_macs(model, depthwise_only: bool = False) -> tuple[int, int, int]:
    """Multiply-adds per image of the base's convolutions: (all, trainable, input-gradient).

    A training step costs 2 FLOP per MAC for the forward pass over all layers, for the
    weight gradient of the trainable ones, and for the input gradient of those trainable
    layers that have a trainable layer below them. A convolution's MACs are its output
    positions times its kernel's size, which counts both standard (VGG16, MobileNetV2's
    1x1 expansions and projections) and depthwise convolutions (kernel kh x kw x C x 1).
    VGG16 at 32x32: 0.313 G forward; MobileNetV2 at 224x224: 0.30 G (Sandler et al. 2018).
    depthwise_only: count the depthwise convolutions alone (their share of the work).
    """
    import keras

    from tlkeras.model import find_base

    kinds = (keras.layers.DepthwiseConv2D,) if depthwise_only else (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    total = trainable = input_grad = 0
    seen_trainable = False
    for layer in find_base(model)[1].layers:
        if not isinstance(layer, kinds):
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and layer.trainable:
                seen_trainable = True
            continue
        _, h, w, _ = layer.output.shape
        macs = h * w * int(np.prod(layer.kernel.shape))
        total += macs
        if layer.trainable:
            trainable += macs
            input_grad += macs if seen_trainable else 0
            seen_trainable = True
    return total, trainable, input_grad


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical peak of this machine."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.matmul(x, x))
    return 2 * n**3 / median_seconds(lambda: matmul(a).numpy(), repeats)


def _model(precision: str, mcfg):
    """mcfg: a ModelConfig (backbone, weights, resolution), built for CIFAR-10's shape."""
    import keras

    from tlkeras.model import build_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        return build_model(mcfg, cifar10_info())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def finetune_images_per_second(model, steps: int, batch: int = 64) -> float:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, (batch * steps,))
    model.fit(x[: batch * 3], y[: batch * 3], batch_size=batch, verbose=0)  # trace, warm up
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, verbose=0)
    return batch * steps / (time.perf_counter() - start)


def bench_finetune(quick: bool, mcfg, unfreeze: str) -> list[dict[str, Any]]:
    """Phase 2 as the run does it (precision, resolution, unfreeze) vs plain float32."""
    import keras

    from tlkeras.model import set_finetune_trainable
    from tlkeras.policies import choose_precision, read_cpu_flags

    ours_precision = choose_precision("auto", 0, read_cpu_flags())
    steps = 10 if quick else 40
    rates = {}
    for precision in (ours_precision, "float32"):
        model = _model(precision, dataclasses.replace(mcfg, weights=None))
        set_finetune_trainable(model, unfreeze)
        model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy", jit_compile=False)
        rates[precision] = finetune_images_per_second(model, steps)
    macs = sum(conv_macs(model))
    depthwise_share = sum(conv_macs(model, depthwise_only=True)) / macs
    flops = rates[ours_precision] * 2 * macs
    compute = "bfloat16" if "bfloat16" in ours_precision else "float32"
    peak = matmul_peak(compute)
    setup = dict(backbone=mcfg.backbone, unfreeze=unfreeze, resolution=mcfg.resolution, batch=64, steps=steps)
    return [
        figure(
            "finetune_images_per_second",
            "images/s",
            rates[ours_precision],
            rates["float32"],
            ours_setup=ours_precision,
            baseline_setup="float32, no XLA (keras.io recipe)",
            **setup,
        ),
        figure(
            "finetune_flops_fraction_of_matmul_peak",
            "fraction",
            flops / peak,
            1.0,
            achieved_gflops=round(flops / 1e9, 1),
            peak_gflops=round(peak / 1e9, 1),
            gflop_per_image=round(2 * macs / 1e9, 3),
            depthwise_share_of_macs=round(depthwise_share, 3),
            peak_dtype=compute,
            note="baseline 1.0 is the measured matmul peak",
            **setup,
        ),
    ]


def bench_adversarial(quick: bool, cfg) -> list[dict[str, Any]]:
    """The cost of finetune.adversarial: FGSM-RS fine-tuning images/s (robustness.
    AdversarialFinetune: one more forward and backward pass per step) against standard
    fine-tuning, at the run's precision, resolution and unfreeze setting; and the PGD guard
    run after every epoch (finetune.robust_check_images) in seconds. Their ratio is the
    phase-2 time ratio the issue bounds (2.5x): per epoch, steps x step time + guard."""
    import keras

    from tlkeras.model import set_finetune_trainable
    from tlkeras.policies import choose_precision, read_cpu_flags
    from tlkeras.robustness import FGSM_RS_STEP_FACTOR, AdversarialFinetune, RobustAccuracy

    precision = choose_precision("auto", 0, read_cpu_flags())
    steps, f = 10 if quick else 40, cfg.finetune
    rates = {}
    for adversarial in (True, False):
        model = _model(precision, dataclasses.replace(cfg.model, weights=None))
        set_finetune_trainable(model, f.unfreeze)
        trained = (
            AdversarialFinetune(model, f.epsilon, f.step_size or FGSM_RS_STEP_FACTOR * f.epsilon)
            if adversarial
            else model
        )
        trained.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy", jit_compile=False)
        rates[adversarial] = finetune_images_per_second(trained, steps)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (f.robust_check_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (f.robust_check_images,))
    guard = RobustAccuracy(_model("float32", dataclasses.replace(cfg.model, weights=None)))
    guard(images[:8], labels[:8], f.epsilon)  # trace
    start = time.perf_counter()
    guard(images, labels, f.epsilon)  # every image attacked: an upper bound
    guard_s = time.perf_counter() - start
    setup = dict(
        backbone=cfg.model.backbone,
        unfreeze=f.unfreeze,
        resolution=cfg.model.resolution,
        batch=64,
        steps=steps,
        precision=precision,
        epsilon=f.epsilon,
    )
    return [
        figure(
            "adversarial_finetune_images_per_second",
            "images/s",
            rates[True],
            rates[False],
            ours_setup="FGSM-RS (finetune.adversarial)",
            baseline_setup="standard fine-tuning",
            **setup,
        ),
        figure(
            "adversarial_guard_seconds_per_epoch",
            "s",
            guard_s,
            len(images) / rates[False],
            baseline_setup="standard fine-tuning of the same number of images",
            note=f"PGD-10 on {len(images)} val images after every epoch, all attacked: an upper bound "
            "(training attacks only those classified right)",
            **setup,
        ),
    ]


def bench_depthwise(quick: bool) -> list[dict[str, Any]]:
    """What limits a depthwise convolution on a CPU: its FLOP/s against a 1x1 (pointwise)
    convolution on the same float32 tensor (64 x 16 x 16 x 192: a MobileNetV2 expansion
    at 128x128 input), forward only.

    Per output value a 3x3 depthwise convolution does 9 MACs, a 1x1 one with 192 input
    channels 192, over the same bytes moved (one value read, one written): 2.25 against
    48 FLOP per byte, so the depthwise one is bound by memory bandwidth, not by the
    multiply units a matmul saturates. A ratio well below 1 is that, measured.
    """
    import keras
    import tensorflow as tf

    x = tf.random.normal((64, 16, 16, 192))
    rates = {}
    for name, layer, macs_per_output in (
        ("depthwise", keras.layers.DepthwiseConv2D(3, padding="same"), 9),
        ("pointwise", keras.layers.Conv2D(192, 1), 192),
    ):
        forward = tf.function(layer)
        seconds = median_seconds(lambda f=forward: f(x).numpy(), 5 if quick else 20)
        rates[name] = 2 * macs_per_output * x.shape.num_elements() / seconds
    return [
        figure(
            "depthwise_conv_gflops",
            "GFLOP/s",
            rates["depthwise"] / 1e9,
            rates["pointwise"] / 1e9,
            baseline_setup="1x1 convolution, 192 -> 192 channels",
            shape=[64, 16, 16, 192],
            flop_per_byte={"depthwise": 2.25, "pointwise": 48.0},
            dtype="float32",
        )
    ]


def bench_phase1(cfg, quick: bool) -> list[dict[str, Any]]:
    """Phase 1 (frozen base, head only, 5 epochs), ours vs the keras.io guide's recipe.

    Baseline: tfds.load, batch, cache, prefetch, random flip; model.fit on the whole
    model, the frozen base recomputed every epoch (validation too); float32, no XLA.
    Ours: the features of the images and of their mirror images computed once under our
    precision, then the head fitted on them (what train.py does). Same model, data,
    resolution, head, optimizer and epochs; wall time from a built model to the last epoch.
    """
    import dataclasses

    import keras
    import tensorflow as tf

    from tlkeras.data import make_datasets
    from tlkeras.model import split_at_features
    from tlkeras.policies import choose_precision, read_cpu_flags
    from tlkeras.training import cached_feature_data, compile_for_phase

    epochs, resolution = 5, 32 if quick else cfg.model.resolution
    train_split, val_split = ("train[:2000]", "train[48000:49000]") if quick else ("train[:5000]", "train[48000:]")
    data = dataclasses.replace(cfg.data, download=False, batch_size=64, train_split=train_split, val_split=val_split)
    head = dataclasses.replace(cfg.head, epochs=epochs, mirrored_features=True)
    runtime = dataclasses.replace(cfg.runtime, jit_compile=False, steps_per_execution=1)
    cfg = dataclasses.replace(
        cfg, data=data, head=head, runtime=runtime, model=dataclasses.replace(cfg.model, resolution=resolution)
    )
    splits = make_datasets(data, cfg.seed, resolution)
    shuffled = make_datasets(dataclasses.replace(data, augment=False), cfg.seed, resolution).train

    def run(precision: str, cached: bool) -> tuple[float, float]:
        """Seconds and final val accuracy; the keras.io recipe when not `cached`."""
        keras.utils.set_random_seed(cfg.seed)
        model = _model(precision, cfg.model)
        if cached:
            start = time.perf_counter()
            extractor, head = split_at_features(model)
            with tempfile.TemporaryDirectory() as features:  # computed here, never reused
                train, val, _, _ = cached_feature_data(extractor, cfg, splits, Path(features))
            trained = head
        else:
            flip = tf.image.random_flip_left_right  # per image, like the guide's RandomFlip
            train = shuffled.map(lambda x, y: (flip(x), y)) if data.augment else shuffled
            val, trained = splits.val, model
            start = time.perf_counter()
        compile_for_phase(trained, cfg, "head", 0)
        history = trained.fit(train, validation_data=val, epochs=epochs, verbose=0, shuffle=False)  # tf.data shuffles
        return time.perf_counter() - start, history.history["val_accuracy"][-1]

    for ds in (splits.train_plain, shuffled, splits.val):  # fill the uint8 caches for both sides
        for _ in ds:
            pass
    ours_precision = choose_precision("auto", 0, read_cpu_flags())
    ours_s, ours_acc = run(ours_precision, cached=True)
    base_s, base_acc = run("float32", cached=False)
    # Caching alone, without our precision: how the speed-up splits between the two.
    cached_fp32_s = run("float32", cached=True)[0] if ours_precision != "float32" else ours_s
    setup = dict(
        backbone=cfg.model.backbone,
        epochs=epochs,
        resolution=resolution,
        train_images=splits.num_train,
        val_images=splits.num_val,
        batch=64,
        weights=str(cfg.model.weights),
    )
    views = "with mirrored copies" if data.augment else "no augmentation"
    return [
        figure(
            "phase1_wall_time",
            "s",
            ours_s,
            base_s,
            speedup=round(base_s / ours_s, 2),
            cached_float32_s=round(cached_fp32_s, 1),
            speedup_from_caching_alone=round(base_s / cached_fp32_s, 2),
            ours_setup=f"features computed once ({ours_precision}, {views}), head fitted on them",
            baseline_setup="keras.io transfer-learning guide: base recomputed every epoch, float32",
            **setup,
        ),
        figure(
            "phase1_val_accuracy",
            "accuracy",
            ours_acc,
            base_acc,
            note="final-epoch validation accuracy of the two runs above",
            **setup,
        ),
    ]


def bench_pipeline(cfg, quick: bool):
    """The training input pipeline alone (decode, augment, shuffle, batch) vs what the
    fastest-consuming phase takes (the frozen base: one forward pass per image)."""
    import dataclasses

    from tlkeras.data import make_datasets
    from tlkeras.policies import choose_precision, read_cpu_flags

    model = _model(choose_precision("auto", 0, read_cpu_flags()), dataclasses.replace(cfg.model, weights=None))
    steps, batch = (10 if quick else 40), 64
    x = np.random.default_rng(0).integers(0, 256, (batch * steps, 32, 32, 3), dtype=np.uint8)
    model.predict(x[: batch * 2], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    model_rate = batch * steps / (time.perf_counter() - start)

    data = dataclasses.replace(cfg.data, download=False, train_split="train[:5000]" if quick else cfg.data.train_split)
    splits = make_datasets(data, cfg.seed, cfg.model.resolution)
    for _ in splits.train:  # first pass fills the cache, as the first epoch does
        pass
    start = time.perf_counter()
    count = sum(int(x.shape[0]) for x, _ in splits.train)
    rate = count / (time.perf_counter() - start)
    return [
        figure(
            "input_pipeline_images_per_second",
            "images/s",
            rate,
            model_rate,
            baseline_setup="frozen-base forward images/s (the fastest consumer)",
            images=count,
            resolution=cfg.model.resolution,
            note="ratio > 1: the pipeline outpaces the model",
        )
    ]


def exported_model(run_dir: Path | None, workdir: Path, mcfg) -> dict[str, Any]:
    if run_dir is not None:
        from tlkeras import rundir

        rundir.check_run(run_dir)
        summary = rundir.read_json(run_dir / rundir.SUMMARY)
        if not summary.get("exports"):
            raise UserError(f"run '{run_dir}' has no export; run python -m tlkeras.export --run-dir {run_dir}")
        return summary["exports"][-1]
    from tlkeras.config import ExportConfig
    from tlkeras.export import export_model
    from tlkeras.litert import Int8Data
    from tlkeras.model import build_model

    info = cifar10_info()
    model = build_model(dataclasses.replace(mcfg, weights=None), info)
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    # A fresh model has no accuracy to keep: the gate is opened, the int8 LiteRT model is timed.
    options = ExportConfig(int8_onnx=False, int8_max_drop=100.0)
    int8 = Int8Data(images[:32], images[32:], np.zeros(8, np.int64))
    return export_model(model, workdir, "tlkeras", images[:8], info.class_names, options=options, int8=int8)


def emit(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        print(json.dumps(line), flush=True)


def run_config(run_dir: Path | None):
    """The run's config, to bench on its data, weights, resolution and unfreeze setting."""
    if run_dir is None:
        return None
    from tlkeras import rundir
    from tlkeras.rundir import check_run

    check_run(run_dir, finished=False)
    cfg = rundir.load_run_config(run_dir)
    if cfg.data.dataset != "cifar10":
        # Its baselines (the keras.io recipe on tfds CIFAR-10, int8 calibration) are CIFAR-10's.
        raise UserError(
            f"the benchmark measures CIFAR-10 runs; '{run_dir}' trained on {cfg.data.dataset}: "
            f"pass a CIFAR-10 run, or no --run-dir (then only a fresh model's inference and "
            f"fine-tuning figures)"
        )
    return cfg


def resolution(text: str) -> int:
    """--resolution: an int of at least 32 (the smallest input either base accepts)."""
    import argparse

    if not text.isdigit() or int(text) < 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in pixels of at least 32")
    return int(text)


FIGURES = ("inference", "phase1", "pipeline", "finetune", "adversarial")  # inference: with int8, depthwise


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a few minutes")
    parser.add_argument("--run-dir", type=Path, help="time this run's exported model")
    parser.add_argument(
        "--backbone",
        choices=("vgg16", "mobilenet_v2"),
        help="without --run-dir: the base of the fresh model (default vgg16)",
    )
    parser.add_argument(
        "--resolution", type=resolution, metavar="PX", help="without --run-dir: the model's input size (default 32)"
    )
    parser.add_argument(
        "--only",
        choices=FIGURES,
        action="append",
        help="only these figures (repeatable; default: all); phase1, pipeline and adversarial need --run-dir",
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    quiet_libraries(args.debug)  # before TensorFlow is imported
    wanted = set(args.only or FIGURES)

    def run() -> None:
        from tlkeras.config import ModelConfig

        if args.run_dir and (args.backbone or args.resolution):
            raise UserError(
                "--backbone and --resolution describe a fresh model; with --run-dir "
                "the run's own are timed: drop them, or drop --run-dir"
            )
        if not args.run_dir and wanted <= {"phase1", "pipeline", "adversarial"}:
            raise UserError(f"--only {' '.join(sorted(wanted))} needs --run-dir: a CIFAR-10 run to measure")
        cfg = run_config(args.run_dir)
        mcfg = (
            cfg.model
            if cfg
            else ModelConfig(backbone=args.backbone or "vgg16", weights=None, resolution=args.resolution or 32)
        )
        if "inference" in wanted:
            with tempfile.TemporaryDirectory() as tmp:
                record = exported_model(args.run_dir, Path(tmp), mcfg)
                savedmodel, onnx_path = Path(record["savedmodel"]), Path(record["onnx"])
                emit(bench_inference(savedmodel, onnx_path, args.quick, mcfg))
                emit(bench_int8(onnx_path, Path(tmp), args.quick, bench_data(args.run_dir, args.quick)))
                emit(bench_litert(record, args.quick))
            if mcfg.backbone == "mobilenet_v2":
                emit(bench_depthwise(args.quick))
        if cfg is None:
            print(
                "phase 1, input-pipeline and adversarial figures need a CIFAR-10 run: pass --run-dir", file=sys.stderr
            )
            if "finetune" in wanted:
                emit(bench_finetune(args.quick, mcfg, "all"))
            return
        for name, needs_data in (("phase1", bench_phase1), ("pipeline", bench_pipeline)):
            try:
                if name in wanted:
                    emit(needs_data(cfg, args.quick))
            except UserError as e:  # no CIFAR-10 here: skip these figures, keep the others
                print(f"{needs_data.__name__} skipped: {e}", file=sys.stderr)
        if "finetune" in wanted:
            emit(bench_finetune(args.quick, cfg.model, cfg.finetune.unfreeze))
        if "adversarial" in wanted:
            emit(bench_adversarial(args.quick, cfg))

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
