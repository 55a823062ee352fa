"""The trust report of a finished run: how far its probabilities and predictions hold up.

    python -m tlkeras.evaluate --run-dir runs/<run> [--quick]

Needs nothing but the run folder (config.yaml, dataset.json, model.keras) and the run's
data; writes into it, atomically:

    report.json        clean accuracy and balanced accuracy (mean per-class recall), warnings
                       (a class never predicted right, imbalanced train classes);
                       test-time-augmentation accuracy (and its cost);
                       ECE and NLL before and after temperature scaling (T kept only if it
                       helps held-out val images); accuracy under 7 common corruptions x 5
                       severities; FGSM and PGD-10 robust accuracy at 1, 2, 4, 8 /255
                       (cascaded over the budgets); the settings and sizes used
    reliability.png    reliability diagram before and after temperature scaling
    misclassified.png  the highest-loss test images, true and predicted names, probabilities

and a short table to the log. Subset sizes are the run's `evaluate.*` settings (--quick:
the `quick_*` ones, also used by the report at the end of training, which reuses
training's test pass: its clean accuracy and calibration cover the whole test split;
on a small run it skips the corruption and adversarial passes, see quick_skip_reason).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras import rundir
from tlkeras.console import Progress, quiet_libraries
from tlkeras.errors import ArgumentParser, UserError, run_cli

log = logging.getLogger("tlkeras")

RELIABILITY_PNG = "reliability.png"
GALLERY_PNG = "misclassified.png"
ECE_BINS = 15  # Guo et al. 2017 (and Naeini et al. 2015) use 15 equal-width bins
GALLERY_SIZE = 16
T_BOUNDS = (0.05, 20.0)  # the temperature search range; a fit at either end is no fit


# ----------------------------------------------------------------------------- calibration
# Home-made, 20 lines, rather than tfp.stats.expected_calibration_error: tensorflow-
# probability 0.25 (the latest) imports tf_keras (a second, Keras 2 copy) when it loads and
# fails without it under Keras 3; a product dependency for one sum was not worth it.


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): the top-class confidence split into
    `bins` equal-width bins (lo, hi] of [0, 1]; sum over bins of (bin share of examples) x
    |bin accuracy - bin mean confidence|. probs: [n, C] rows summing to 1; labels: int [n].
    Returns a fraction (0.031 = 3.1%); 0 for no examples."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per bin: its range, example count, accuracy and mean confidence (None when empty)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": int(m.sum()),
                "accuracy": float(correct[m].mean()) if m.any() else None,
                "confidence": float(confidence[m].mean()) if m.any() else None,
            }
        )
    return rows


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true class) of softmax(logits / T), in nats."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, low: float = T_BOUNDS[0], high: float = T_BOUNDS[1]
) -> float:
    """Temperature scaling (Guo et al. 2017): the one T > 0 minimising the NLL of
    softmax(logits / T) on held-out data, searched over log T in [low, high] with SciPy's
    bounded scalar minimiser (the NLL is convex in 1/T, so unimodal in log T; Guo et al.
    used L-BFGS, and one scalar needs no more). logits: [n, C]; labels: int [n]."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(np.exp(result.x))


def choose_temperature(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, dict[str, Any]]:
    """The temperature to ship, from the val split's logits [n, C] and int labels [n]:
    fit_temperature on all of them, kept only if (1) it is an interior minimum of the NLL,
    not a bound of the search (when every val image is right the NLL falls towards T -> 0
    and the "fit" would turn every answer into 0 or 1), and (2) in 2-fold cross-validation
    each half's fitted temperature, also interior, lowers the NLL of the other half. Else
    1.0, with a warning and the reason. A few hundred val images of an undertrained model
    can fit a T that makes things worse elsewhere; the check costs milliseconds. Fewer than
    20 val images give no evidence either way: T = 1. Returns (T, a record of the evidence)."""
    low, high = T_BOUNDS

    def interior(t: float) -> bool:
        return low * 1.01 < t < high / 1.01

    fitted = fit_temperature(logits, labels)
    halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
    record: dict[str, Any] = {"fitted": round(fitted, 4), "kept": False, "held_out_nll": None}
    if min(len(h) for h in halves) < 10:
        record["reason"] = f"too few val images to check ({len(labels)}; 20 needed)"
    elif not interior(fitted):
        record["reason"] = (
            f"the NLL has no minimum inside [{low}, {high}] (every val image right, or "
            f"every one wrong): no temperature to fit"
        )
    else:
        folds = []
        for fit_on, score_on in (halves, halves[::-1]):
            t = fit_temperature(logits[fit_on], labels[fit_on])
            folds.append(
                {
                    "fitted": round(t, 4),
                    "T=1": round(negative_log_likelihood(logits[score_on], labels[score_on]), 4),
                    "fitted T": round(negative_log_likelihood(logits[score_on], labels[score_on], t), 4),
                    "interior": interior(t),
                }
            )
        record["held_out_nll"] = folds
        record["kept"] = all(f["interior"] and f["fitted T"] < f["T=1"] for f in folds)
        if not record["kept"]:
            record["reason"] = "a temperature fitted on one half of val did not lower the NLL of the other half"
    if record["kept"]:
        return fitted, record
    log.warning("calibration: the temperature fitted on val (%.3f) is not kept: %s; T = 1", fitted, record["reason"])
    return 1.0, record


def val_temperature(logits_fn, val, seed: int = 0) -> tuple[float, dict[str, Any]]:
    """choose_temperature on the logits of a batched (images, labels) val dataset: the T
    that training's exports fold in and the report shows, one code path for both."""
    val_x, val_y = to_arrays(val)
    temperature, evidence = choose_temperature(predict_logits(logits_fn, val_x), val_y, seed)
    return temperature, {**evidence, "fitted_on": f"val ({len(val_y)} images)"}


# ----------------------------------------------------------------------------- the headline
# Accuracy alone hides a dead class: 500 ants and 5 bees, every bee called an ant, is
# "0.99". Balanced accuracy (mean per-class recall) is 0.5 there, and the warnings name it.

IMBALANCE_RATIO = 10  # max/min train images per class from which a warning names data.class_weight


def per_class_recall(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Per class: the share of its test images predicted as it (recall); None for a class
    with no test image. preds, labels: int [n]."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    out = []
    for c in range(num_classes):
        mine = labels == c
        out.append(float((preds[mine] == c).mean()) if mine.any() else None)
    return out


def balanced_accuracy(recalls: list[float | None]) -> float:
    """The mean recall over the classes that have test images (sklearn's
    balanced_accuracy_score); 0 when no class has any."""
    present = [r for r in recalls if r is not None]
    return float(np.mean(present)) if present else 0.0


def imbalance_warning(class_names, train_counts, class_weight: bool = False) -> str | None:
    """A line when the train set's max/min images per class reach IMBALANCE_RATIO, naming
    data.class_weight=true unless it is on; None otherwise."""
    counts = [int(n) for n in train_counts or []]
    if not counts or min(counts) <= 0 or max(counts) / min(counts) < IMBALANCE_RATIO:
        return None
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    fix = "(data.class_weight=true is on)" if class_weight else "; data.class_weight=true weighs the classes equally"
    return (
        f"train classes are imbalanced: '{class_names[big]}' {counts[big]} images against "
        f"'{class_names[small]}' {counts[small]} (ratio {counts[big] / counts[small]:.0f}); accuracy favours "
        f"the large classes, read the balanced accuracy{' ' if class_weight else ''}{fix}"
    )


def dead_class_warning(class_names, recalls: list[float | None], train_counts=None, class_weight=False) -> str | None:
    """A line naming each class none of whose test images is predicted right (recall 0),
    with data.class_weight=true when the train set is imbalanced and it is off; None when
    every class with test images is found at least once."""
    dead = [name for name, r in zip(class_names, recalls) if r == 0.0]
    if not dead:
        return None
    names = ", ".join(f"'{n}'" for n in dead[:10]) + (f" and {len(dead) - 10} more" if len(dead) > 10 else "")
    helps = imbalance_warning(class_names, train_counts, False) and not class_weight
    return (
        f"class {names}: none of its test images is predicted right (recall 0), which the accuracy "
        f"hides; read the balanced accuracy{'; data.class_weight=true weighs the classes equally' if helps else ''}"
    )


def headline_warnings(class_names, recalls, train_counts=None, class_weight: bool = False) -> list[str]:
    """The two warnings above that apply, for report.json and summary.json. Pure."""
    lines = (
        dead_class_warning(class_names, recalls, train_counts, class_weight),
        imbalance_warning(class_names, train_counts, class_weight),
    )
    return [line for line in lines if line]


# ----------------------------------------------------------------------------- predictions


def logits_function(model):
    """A traced function: uint8 images [b, S, S, 3] -> float32 logits [b, C] of `model`
    (robustness.pixel_logits); make it once per model, it is traced on its first call."""
    import tensorflow as tf

    from tlkeras.robustness import pixel_logits

    return tf.function(lambda x: pixel_logits(model, tf.cast(x, tf.float32)), reduce_retracing=True)


def predict_logits(logits_fn, images: np.ndarray, batch_size: int = 128, flip: bool = False) -> np.ndarray:
    """Logits float32 [n, C] of uint8 images [n, S, S, 3] (mirrored first with flip) by a
    logits_function."""
    out = [
        logits_fn(images[i : i + batch_size][:, :, ::-1] if flip else images[i : i + batch_size]).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def dataset_logits(
    logits_fn, dataset, keep: int | None = None, progress=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One streamed pass over a batched (uint8 images, labels) dataset: (the first `keep`
    images uint8 [k, S, S, 3] (all with None), int64 labels [n], float32 logits [n, C]).
    progress: a console.Progress told each batch's image count."""
    xs, ys, zs, kept = [], [], [], 0
    for x, y in dataset.as_numpy_iterator():
        if keep is None or kept < keep:
            xs.append(x if keep is None else x[: keep - kept])
            kept += len(xs[-1])
        ys.append(y)
        zs.append(logits_fn(x).numpy())
        if progress is not None:
            progress.add(len(y))
    if progress is not None:
        progress.done()
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.concatenate(zs)


def to_arrays(dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, S, S, 3], int64 labels [n]) of a batched (images, labels) dataset."""
    xs, ys, n = [], [], 0
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit].astype(np.int64)


def subset(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random k of n (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


# ----------------------------------------------------------------------------- the report


def published_corruptions(cfg, info) -> str | None:
    """The tfds data_dir holding cifar10_corrupted when the run is CIFAR-10's test split at
    32x32 (the published set's images), else None: corruptions are generated instead."""
    if cfg.data.dataset != "cifar10" or info.storage_size != 32 or info.splits.get("test") != "test":
        return None
    data_dir = Path(cfg.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    return str(data_dir) if (data_dir / "cifar10_corrupted").is_dir() else None


def corruption_accuracy(logits_fn, images, labels, cfg, info, seed: int, indices=None) -> dict[str, Any]:
    """Accuracy per corruption and severity 1-5, their mean, of uint8 `images` [n, S, S, 3]
    with int `labels` [n], which are the test split's images at `indices` (int [n]; None:
    the first n): from tfds's cifar10_corrupted (the same test indices) when present, else
    generated in the graph from `images`."""
    import tensorflow as tf

    from tlkeras.robustness import CORRUPTIONS, corrupt

    data_dir = published_corruptions(cfg, info)
    table = {}
    progress = Progress("trust report: corruptions", len(CORRUPTIONS) * 5, "passes")
    for name in CORRUPTIONS:
        row = []
        for severity in range(1, 6):
            if data_dir:
                import tensorflow_datasets as tfds

                last = len(images) if indices is None else int(np.max(indices, initial=-1)) + 1
                ds = tfds.load(
                    f"cifar10_corrupted/{name}_{severity}",
                    split=f"test[:{last}]",
                    data_dir=data_dir,
                    download=False,
                    as_supervised=True,
                )
                x, y = to_arrays(ds.batch(256))
                if indices is not None:
                    x, y = x[indices], y[indices]
            else:
                x = np.concatenate(
                    [
                        corrupt(tf.constant(images[i : i + 256]), name, severity, seed + i).numpy()
                        for i in range(0, len(images), 256)
                    ]
                )
                y = labels
            row.append(round(float((predict_logits(logits_fn, x).argmax(1) == y).mean()), 4))
            progress.add()
        table[name] = row
    progress.done()
    values = np.array(list(table.values()))
    return {
        "source": (
            "tfds cifar10_corrupted (Hendrycks & Dietterich 2019)"
            if data_dir
            else "generated in the graph with the CIFAR-10-C parameters (Hendrycks & Dietterich 2019)"
        ),
        "images": int(len(images)),
        "accuracy": table,
        "mean_per_severity": [round(float(v), 4) for v in values.mean(axis=0)],
        "mean_accuracy": round(float(values.mean()), 4),
    }


def adversarial_accuracy(model, images, labels, seed: int) -> dict[str, Any]:
    """FGSM and PGD-10 (random start) robust accuracy at each budget of EPSILONS (/255),
    each attack cascaded over the budgets (RobustAccuracy.cascade: an image counts as
    robust at a budget only if it also withstood every smaller one)."""
    from tlkeras.robustness import EPSILONS, PGD_STEPS, RobustAccuracy

    fgsm, pgd = RobustAccuracy(model, fgsm=True), RobustAccuracy(model)
    clean = pgd.correct(images, labels, 0)
    return {
        "images": int(len(images)),
        "seed": seed,
        "pgd_steps": PGD_STEPS,
        "clean_accuracy": round(float(clean.mean()) if len(clean) else 0.0, 4),
        "budgets": "cascaded: robust at a budget = withstood it and every smaller one",
        "fgsm": {str(e): round(v, 4) for e, v in fgsm.cascade(images, labels, EPSILONS, clean=clean).items()},
        "pgd": {str(e): round(v, 4) for e, v in pgd.cascade(images, labels, EPSILONS, seed, clean).items()},
    }


# The end-of-training (quick) report skips its corruption and adversarial passes on a small
# run: each costs a fixed ~30-40 s of tracing on a 2-core CPU (hymenoptera with MobileNetV2:
# 34 s and 40 s of a 149 s run whose two phases took 50 s), more than training such a run.
QUICK_MIN_TRAIN_IMAGES = 1000
QUICK_MIN_TEST_IMAGES = 200


def quick_skip_reason(num_train: int, num_test: int, run_dir="<run>") -> str | None:
    """Why the quick report skips the corruption and adversarial passes (None: it runs them)."""
    if num_train < QUICK_MIN_TRAIN_IMAGES:
        small = f"{num_train} train images < {QUICK_MIN_TRAIN_IMAGES}"
    elif num_test < QUICK_MIN_TEST_IMAGES:
        small = f"{num_test} test images < {QUICK_MIN_TEST_IMAGES}"
    else:
        return None
    return (
        f"skipped in the quick report of a small run ({small}): their fixed cost (~30-40 s each "
        f"on a 2-core CPU) would exceed the training's; python -m tlkeras.evaluate --run-dir {run_dir} runs them"
    )


def trust_report(model, cfg, splits, run_dir: Path, quick: bool = False, test=None) -> dict[str, Any]:
    """Computes the report for `model` (build_model's, float32) on `splits` (make_datasets'),
    writes report.json and the two PNGs into run_dir and logs a short table; returns the
    report. Deterministic for a given cfg.seed (subsets, noise and random starts).
    test: optional (uint8 images [n, S, S, 3], int labels [n], float logits [n, C]) of the
    whole test split, already computed (training's own test pass): then the clean accuracy
    and calibration use all n images at no cost, and the mirror-image pass of TTA the
    test-images subset only."""
    e = cfg.evaluate
    sizes = (
        (e.quick_test_images, e.quick_corruption_images, e.quick_adversarial_images)
        if quick
        else (e.test_images, e.corruption_images, e.adversarial_images)
    )
    start = time.perf_counter()
    info = splits.info
    logits_fn = logits_function(model)
    # Subsets are seeded draws from the whole split, the same with or without `test`.
    all_x, all_y, all_logits = test if test is not None else (*to_arrays(splits.test), None)
    pick = subset(len(all_y), sizes[0], cfg.seed)
    if all_logits is None:  # the clean pass on the subset only
        t0 = time.perf_counter()
        test_x, test_y, logits = all_x[pick], all_y[pick], predict_logits(logits_fn, all_x[pick])
        clean_s = time.perf_counter() - t0
        tta_pick = np.arange(len(pick))
    else:
        if len(all_logits) != len(all_y):
            raise ValueError(f"test logits for {len(all_logits)} images, labels for {len(all_y)}")
        test_x, test_y, logits, tta_pick, clean_s = all_x, all_y, all_logits, pick, None
    log.info("trust report: calibration on %d val images, then TTA on %d test images", info.num_val, len(tta_pick))
    temperature, evidence = val_temperature(logits_fn, splits.val, cfg.seed)
    t0 = time.perf_counter()
    mirrored = predict_logits(logits_fn, test_x[tta_pick], flip=True)
    mirror_s = time.perf_counter() - t0
    probs, probs_t = softmax(logits), softmax(logits, temperature)
    recalls = per_class_recall(probs.argmax(1), test_y, info.num_classes)
    warnings = headline_warnings(info.class_names, recalls, info.train_class_counts, cfg.data.class_weight)
    # fastai's tta: the mean of the two views' probabilities
    tta = (probs[tta_pick] + softmax(mirrored)) / 2
    report: dict[str, Any] = {
        "quick": quick,
        "test_split": info.splits.get("test"),
        "clean": {
            "accuracy": round(float((probs.argmax(1) == test_y).mean()), 4),
            "balanced_accuracy": round(balanced_accuracy(recalls), 4),  # mean per-class recall
            "per_class_recall": {n: None if r is None else round(r, 4) for n, r in zip(info.class_names, recalls)},
            "images": int(len(test_y)),
            "seconds": None if clean_s is None else round(clean_s, 1),  # None: training's pass, reused
            "reused_training_test_pass": clean_s is None,
        },
        "tta": {
            "accuracy": round(float((tta.argmax(1) == test_y[tta_pick]).mean()), 4),
            "images": int(len(tta_pick)),
            "clean_accuracy": round(float((probs[tta_pick].argmax(1) == test_y[tta_pick]).mean()), 4),
            "views": ["image", "mirror image"],
            "mirror_pass_seconds": round(mirror_s, 1),  # the extra cost of TTA over the clean pass
            "cost": None if clean_s is None else round((clean_s + mirror_s) / clean_s, 2),
        },
        "calibration": {
            "temperature": round(temperature, 4),
            "fitted_on": evidence.pop("fitted_on"),
            "cross_validation": evidence,
            "bins": ECE_BINS,
            "ece_before": round(expected_calibration_error(probs, test_y), 4),
            "ece_after": round(expected_calibration_error(probs_t, test_y), 4),
            "nll_before": round(negative_log_likelihood(logits, test_y), 4),
            "nll_after": round(negative_log_likelihood(logits, test_y, temperature), 4),
            "exports_calibrated": bool(cfg.evaluate.fold_temperature and temperature != 1.0),
        },
    }
    report["warnings"] = warnings
    if test is None:  # training logs them itself after its test pass
        for line in warnings:
            log.warning("%s", line)
    skipped = quick_skip_reason(info.num_train, len(all_y), run_dir) if quick else None
    if skipped:
        report["corruptions"] = report["adversarial"] = {"skipped": skipped}
        log.info("trust report: corruption and adversarial passes %s", skipped)
    else:
        t0 = time.perf_counter()
        c_pick = subset(len(all_y), sizes[1], cfg.seed + 1)
        corrupted = corruption_accuracy(logits_fn, all_x[c_pick], all_y[c_pick], cfg, info, cfg.seed, c_pick)
        report["corruptions"] = {**corrupted, "seconds": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        a_pick = subset(len(all_y), sizes[2], cfg.seed + 2)
        log.info("trust report: FGSM and PGD-10 attacks on %d test images", len(a_pick))
        attacked = adversarial_accuracy(model, all_x[a_pick], all_y[a_pick], cfg.seed)
        report["adversarial"] = {**attacked, "seconds": round(time.perf_counter() - t0, 1)}

    shown = probs_t if cfg.evaluate.fold_temperature else probs  # what the exports answer
    save_reliability_png(probs, probs_t, test_y, temperature, run_dir / RELIABILITY_PNG)
    save_gallery_png(test_x, test_y, shown, info.class_names, run_dir / GALLERY_PNG)
    report["reliability_diagram"] = RELIABILITY_PNG
    report["misclassified_gallery"] = GALLERY_PNG
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    rundir.write_json(run_dir / rundir.REPORT, report)
    log_table(report)
    return report


def log_table(r: dict[str, Any]) -> None:
    c, cal, adv = r["clean"], r["calibration"], r["adversarial"]
    log.info("trust report%s: %d test images, %.0f s", " (quick)" if r["quick"] else "", c["images"], r["wall_time_s"])
    t = r["tta"]
    log.info("  accuracy  %.4f, balanced %.4f (mean per-class recall)", c["accuracy"], c["balanced_accuracy"])
    # TTA is scored on a subset: its gain is against the clean figure on that same subset,
    # never against the line above (which reads as TTA lowering accuracy).
    log.info(
        "  TTA       image + mirror %.4f, image alone %.4f on the same %d images: %+.4f (+%.0f s)",
        t["accuracy"],
        t["clean_accuracy"],
        t["images"],
        t["accuracy"] - t["clean_accuracy"],
        t["mirror_pass_seconds"],
    )
    log.info(
        "  ECE       %.2f%% -> %.2f%% after T=%.3f   NLL %.3f -> %.3f",
        100 * cal["ece_before"],
        100 * cal["ece_after"],
        cal["temperature"],
        cal["nll_before"],
        cal["nll_after"],
    )
    corr = r["corruptions"]
    if "skipped" in corr:
        log.info("  corrupted, FGSM, PGD: skipped (small run; python -m tlkeras.evaluate runs them)")
        return
    log.info(
        "  corrupted mean %.4f (%d images each; severity 1-5: %s)",
        corr["mean_accuracy"],
        corr["images"],
        " ".join(f"{v:.3f}" for v in corr["mean_per_severity"]),
    )
    for kind in ("fgsm", "pgd"):
        budgets = "  ".join(f"{e}/255 {v:.3f}" for e, v in adv[kind].items())
        log.info("  %-9s %s (%d images, clean %.3f)", kind.upper(), budgets, adv["images"], adv["clean_accuracy"])


# ----------------------------------------------------------------------------- pictures


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with rundir.atomic(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def save_reliability_png(probs, probs_t, labels, temperature: float, path: Path) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharey=True)
    for ax, p, title in ((axes[0], probs, "model"), (axes[1], probs_t, f"temperature {temperature:.2f}")):
        rows = [r for r in reliability_bins(p, labels) if r["count"]]
        ax.bar(
            [r["low"] for r in rows],
            [r["accuracy"] for r in rows],
            width=1 / ECE_BINS,
            align="edge",
            edgecolor="black",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_title(f"{title}: ECE {100 * expected_calibration_error(p, labels):.2f}%")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def save_gallery_png(images, labels, probs, class_names, path: Path, count: int = GALLERY_SIZE) -> None:
    """The `count` highest-loss images (fastai's plot_top_losses): true and predicted names
    with the predicted class's and the true class's probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))
    top = np.argsort(-loss)[:count]
    cols = 4
    rows = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), top):
        pred = int(probs[i].argmax())
        ax.imshow(images[i])
        ax.set_title(
            f"true {class_names[labels[i]]} {probs[i, labels[i]]:.2f}\npred {class_names[pred]} {probs[i, pred]:.2f}",
            fontsize=8,
        )
    fig.suptitle("highest-loss test images: true and predicted class, probability")
    fig.tight_layout()
    _save(fig, path)


def test_metrics(preds: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Test accuracy, per-class accuracy (keyed by class name; None for a class with no test
    image) and the confusion matrix (rows: true class, columns: predicted, in class-index
    order) of predicted classes `preds` int [n] against `labels` int [n]."""
    k = len(class_names)
    matrix = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    recalls = per_class_recall(preds, labels, k)  # None: no test image of that class
    return {
        "test_accuracy": float((preds == labels).mean()),
        "test_balanced_accuracy": round(balanced_accuracy(recalls), 4),  # mean per-class recall
        "test_examples": int(labels.size),
        "per_class_test_accuracy": dict(zip(class_names, [None if r is None else round(r, 4) for r in recalls])),
        "confusion_matrix": matrix.tolist(),
    }


def save_confusion_png(matrix: list[list[int]], class_names: tuple[str, ...], title: str, path: Path) -> None:
    """Row-normalised confusion matrix; counts in the cells up to 20 classes, and a figure
    that grows with the class count so 100+ names stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    k = len(class_names)
    side = max(6.0, 0.16 * k + 2)  # about 0.16 inch per class: 102 classes -> 18 inches
    fig, ax = plt.subplots(figsize=(side + 1, side))
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > m.sum(axis=1)[i] / 2 else "black",
            )
    font = 9 if k <= 20 else 6
    ax.set_xticks(
        range(k), class_names, rotation=90 if k > 20 else 45, ha="center" if k > 20 else "right", fontsize=font
    )
    ax.set_yticks(range(k), class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} test, accuracy {m.trace() / max(m.sum(), 1):.3f}")
    fig.tight_layout()
    try:
        with rundir.atomic(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- the command


def evaluate_run(run_dir: Path, quick: bool = False) -> dict[str, Any]:
    """The report of a finished run, from its folder alone (data read, never downloaded)."""
    import dataclasses

    from tlkeras.data import make_datasets

    rundir.check_run(run_dir)
    cfg, info, model = rundir.load_run(run_dir)
    data = dataclasses.replace(cfg.data, download=False, cache=False, augment=False)
    splits = make_datasets(data, cfg.seed, cfg.model.resolution)
    if splits.info.class_names != info.class_names or splits.info.num_test != info.num_test:
        raise UserError(
            f"the data of run '{run_dir}' has changed since training (classes or test "
            f"count differ from dataset.json); restore it to evaluate this run"
        )
    # One writer: not beside a train or another evaluate; the table joins the run's log.
    with rundir.locked(run_dir), rundir.logging_to(run_dir):
        return trust_report(model, cfg, splits, run_dir, quick)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished training run")
    parser.add_argument(
        "--quick", action="store_true", help="the evaluate.quick_* subset sizes (the end-of-training report's)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        rundir.check_run(args.run_dir)  # seconds, before TensorFlow loads
        quiet_libraries(args.debug)
        evaluate_run(args.run_dir, args.quick)
        print(f"wrote {args.run_dir / rundir.REPORT}, {RELIABILITY_PNG}, {GALLERY_PNG}")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
