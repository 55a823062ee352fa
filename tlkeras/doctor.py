"""A report of the data, not the model: likely label errors, duplicates, leaks between
splits, outliers and class balance, found from the frozen base's features.

    python -m tlkeras.doctor --set data.dataset=./photos [--config FILE] [--run-dir DIR]
    python -m tlkeras.train --set data.dataset=./photos --set data.exclude=runs/<...>/flagged.csv

writes doctor.json, flagged.csv (path, issue, given, suggested, score; issue one of label,
duplicate, leak, outlier) and gallery_<issue>.png into the run folder (default
runs/<time>-doctor-<name>). The data is only read: a later run leaves the flagged images out
with `data.exclude`. Training starts with the cheap part (exact duplicates and leaks, by file
hash) as one log line: `quick_check`.

- Label errors: out-of-fold probabilities of a seeded k-fold linear probe (logistic
  regression on the standardised features), read by cleanlab's `find_label_issues`
  (confident learning, Northcutt et al. 2021).
- Duplicates: the same file content (SHA-256; pixels for tfds), or features with a cosine
  similarity of at least doctor.near_duplicate_similarity, as groups. A group with two
  classes is a label conflict; one spanning two splits is a leak.
- Outliers: cleanlab's OutOfDistribution score (kNN distance in feature space) far below
  the median, and blank or near-constant images (placeholders).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.config import add_config_arguments
from tlkeras.console import quiet_libraries
from tlkeras.errors import ArgumentParser, UserError, run_cli

log = logging.getLogger("tlkeras")

ISSUES = ("label", "duplicate", "leak", "outlier")
COLUMNS = ("path", "issue", "given", "suggested", "score")
REPORT, FLAGGED, FEATURES = "doctor.json", "flagged.csv", "features.npz"
ROLES = ("train", "val", "test")
# Near-constant: this share of the pixels in one colour bin (16 levels per channel), e.g.
# the "image not found" placeholder (94% near-white) or a blank frame.
CONSTANT_SHARE = 0.9
THUMBNAIL = 96  # gallery cells, pixels
PROBE_C = 1e-3  # the linear probe's inverse L2 strength on standardised features (see docs/doctor.md)
WEAK_PROBE = 0.85  # below this out-of-fold accuracy the label list is mostly hard images


# ---------------------------------------------------------------------------- checks


def file_hashes(paths: list[str]) -> list[str]:
    """SHA-256 of each file's bytes (read in threads: the disk, not the CPU, is the limit)."""

    def one(path: str) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, paths))


class _Groups:
    """Union-find over example indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)

    def groups(self) -> list[list[int]]:
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def exact_groups(keys: list[str]) -> list[list[int]]:
    """Indices sharing one key (a content hash), groups of two or more, in order."""
    first: dict[str, int] = {}
    groups = _Groups(len(keys))
    for i, key in enumerate(keys):
        groups.join(i, first.setdefault(key, i))
    return groups.groups()


def near_duplicate_pairs(features: np.ndarray, threshold: float, block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity) for i < j with similarity >= threshold, on features centred
    on their mean (without centring, every pair of post-ReLU features looks alike).
    Computed in blocks of rows: memory grows with n, not n^2."""
    x = features.astype(np.float32) - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pairs = []
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if i < c:
                pairs.append((i, int(c), float(sims[r, c])))
    return pairs


def label_issues(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    """Likely label errors: cleanlab's find_label_issues on the out-of-fold probabilities of
    a linear probe (multinomial logistic regression on the standardised features, seeded
    stratified k-fold). Returns {"indices": flagged, most suspicious first, "suggested":
    the probe's class per example, "scores": 1 - the probability of the given label, "pred_probs",
    "probe_accuracy", "folds"}; k is lowered to the smallest class's count (no issues below 2)."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, np.int64)
    n, classes = len(labels), int(labels.max()) + 1
    present, dense = np.unique(labels, return_inverse=True)  # a class with no image: no column
    smallest = np.bincount(dense).min()
    k = int(min(folds, smallest))
    if k < 2 or len(present) < 2:
        log.warning("doctor: label errors not checked: a class has %d image(s); the probe needs 2 per class", smallest)
        empty = np.zeros(n)
        return {
            "indices": np.array([], np.int64),
            "suggested": labels,
            "scores": empty,
            "pred_probs": None,
            "probe_accuracy": None,
            "folds": k,
        }
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=1000))
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    dense_probs = cross_val_predict(probe, features, dense, cv=splitter, method="predict_proba")
    indices = find_label_issues(dense, dense_probs, return_indices_ranked_by="self_confidence")
    pred_probs = np.zeros((n, classes))
    pred_probs[:, present] = dense_probs
    return {
        "indices": np.asarray(indices, np.int64),
        "suggested": pred_probs.argmax(1),
        "scores": 1.0 - pred_probs[np.arange(n), labels],
        "pred_probs": pred_probs,
        "probe_accuracy": float((pred_probs.argmax(1) == labels).mean()),
        "folds": k,
    }


def outlier_scores(features: np.ndarray) -> np.ndarray:
    """cleanlab's out-of-distribution score per example from the features alone (average
    distance to the k nearest neighbours, mapped to [0, 1]; lower is more unusual)."""
    from cleanlab.outlier import OutOfDistribution

    k = int(min(10, len(features) - 1))
    with contextlib.redirect_stdout(io.StringIO()):  # "Fitting OOD estimator ..."
        return OutOfDistribution({"k": k}).fit_score(features=features.astype(np.float32))


def robust_low(scores: np.ndarray, deviations: float) -> np.ndarray:
    """Whether each score lies more than `deviations` robust standard deviations (1.4826 x
    the median absolute deviation) below the median."""
    median = np.median(scores)
    spread = 1.4826 * np.median(np.abs(scores - median))
    return scores < median - deviations * max(spread, 1e-6)


def constant_share(images: np.ndarray) -> np.ndarray:
    """Per image (uint8 [n, H, W, 3]), the share of pixels in its most common colour bin
    (16 levels per channel): near 1 for blank frames and placeholders, low for photos."""
    q = images.astype(np.int32) // 16
    codes = (q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]).reshape(len(images), -1)
    return np.array([np.bincount(c, minlength=4096).max() / c.size for c in codes])


def balance(counts: dict[str, int]) -> dict[str, Any]:
    """Per-class counts, the imbalance ratio (largest / smallest) and the advice that applies."""
    values = list(counts.values())
    ratio = max(values) / max(min(values), 1)
    if ratio >= 3:
        advice = (
            f"imbalanced ({ratio:.1f}x): train with --set data.class_weight=true, and read the "
            f"per-class accuracy of the run, not only the overall figure"
        )
    elif ratio >= 1.5:
        advice = f"mildly imbalanced ({ratio:.1f}x); data.class_weight=true may help the smaller classes"
    else:
        advice = "balanced; no weighting needed"
    return {"counts": counts, "imbalance_ratio": round(ratio, 2), "advice": advice}


# ---------------------------------------------------------------------------- the report


def _names(splits) -> tuple[list[str], list[str]]:
    """(name, split role) of every example, train then val then test, as the doctor reads them."""
    names, roles = [], []
    for role, count in zip(ROLES, (splits.num_train, splits.num_val, splits.num_test)):
        listed = splits.files.get(role) or [f"{role}#{i}" for i in range(count)]
        names += listed[:count]
        roles += [role] * count
    return names, roles


def quick_check(splits) -> str | None:
    """The start-of-training check: exact duplicates (file hashes) within and between the
    splits of a folder, logged as one line (a warning if any image leaks between splits);
    seconds, no features. tfds: nothing (its split overlaps are reported by tlkeras.data)."""
    if splits.info.source != "folder" or not splits.files:
        return None
    start = time.perf_counter()
    names, roles = _names(splits)
    groups = exact_groups(file_hashes(names))
    leaks = sum(len({roles[i] for i in g}) > 1 for g in groups)
    found = (
        f"{len(groups)} groups of identical files among {len(names)} images, {leaks} spanning two splits"
        + (" (val/test images the model trains on: exclude the copies)" if leaks else "")
        if groups
        else f"no identical files among {len(names)} images"
    )
    line = (
        f"doctor: {found} ({time.perf_counter() - start:.1f} s); python -m tlkeras.doctor also finds "
        f"label errors, near-duplicates and outliers (data.doctor=false: no check)"
    )
    (log.warning if leaks else log.info)(line)
    return line


def _duplicate_rows(groups, kinds, names, roles, labels, class_names, similarity) -> tuple[list[dict], list[dict]]:
    """flagged.csv rows and doctor.json entries for duplicate groups. In each group the
    first train image (else the first image) is kept; the others are flagged `duplicate`
    in its split and `leak` in another; a group with two classes flags every member
    `duplicate` (which label is right is unknown)."""
    rows, entries = [], []
    for group, kind in zip(groups, kinds):
        order = sorted(group, key=lambda i: (ROLES.index(roles[i]), i))
        keeper = order[0]
        classes = sorted({labels[i] for i in group})
        conflict = len(classes) > 1
        score = 1.0 if kind == "exact" else round(similarity(group), 4)
        for i in order:
            others = [class_names[c] for c in classes if c != labels[i]]
            suggested = "|".join(others)
            base = {"path": names[i], "given": class_names[labels[i]], "suggested": suggested, "score": score}
            if conflict or (i != keeper and roles[i] == roles[keeper]):
                rows.append({**base, "issue": "duplicate"})
            if roles[i] != roles[keeper]:
                rows.append({**base, "issue": "leak"})
        entries.append(
            {
                "kind": kind,
                "similarity": score,
                "classes": [class_names[c] for c in classes],
                "splits": sorted({roles[i] for i in group}, key=ROLES.index),
                "paths": [names[i] for i in order],
            }
        )
    return rows, entries


def examine(cfg, run_dir: Path, argv: list[str] = ()) -> dict[str, Any]:
    """The whole report of `cfg.data` in `run_dir`: doctor.json, flagged.csv and a gallery
    PNG per issue kind. Returns doctor.json's content."""
    import keras
    import tensorflow as tf

    from tlkeras import rundir
    from tlkeras.config import dump_yaml
    from tlkeras.data import make_datasets, read_errors
    from tlkeras.features import compute_features
    from tlkeras.files import atomic, write_atomic, write_json
    from tlkeras.model import build_model, split_at_features
    from tlkeras.recipe import data_settings

    start = time.perf_counter()
    if (run_dir / REPORT).exists():
        raise UserError(f"'{run_dir / REPORT}' exists: that folder holds a doctor report; pass a new --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "doctor.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        with rundir.locked(run_dir):
            write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
            keras.utils.set_random_seed(cfg.seed)
            # The batch and resolution a training run would choose (tlkeras.recipe).
            cfg = data_settings(cfg, accelerator=bool(tf.config.list_physical_devices("GPU")))
            data_cfg = dataclasses.replace(cfg.data, augment=False, cache=False)  # each image is read once
            splits = make_datasets(data_cfg, cfg.seed, cfg.model.resolution)
            info = splits.info
            names, roles = _names(splits)
            log.info("doctor: %d images (%s), %d classes", len(names), info.name, info.num_classes)

            extract_start = time.perf_counter()
            extractor, _ = split_at_features(build_model(cfg.model, info))
            parts = [splits.train_plain, splits.val, splits.test]
            with read_errors(cfg.data):
                pairs = [compute_features(extractor, ds) for ds in parts]
                features = np.concatenate([f for f, _ in pairs])
                labels = np.concatenate([y for _, y in pairs]).astype(np.int64)
                shares, thumbs, pixel_hashes = _image_pass(parts, info.source != "folder")
            extract_s = time.perf_counter() - extract_start
            log.info("doctor: features of %d images in %.0f s", len(labels), extract_s)
            with atomic(run_dir / FEATURES, "the features", features.nbytes) as tmp, tmp.open("wb") as f:
                # for a look of your own: np.load("<run>/features.npz")
                np.savez(f, features=features, labels=labels, names=np.array(names), splits=np.array(roles))
            report = _report(cfg, info, names, roles, features, labels, shares, thumbs, pixel_hashes, run_dir)
            report["timing_s"] = {"features": round(extract_s, 1), "total": round(time.perf_counter() - start, 1)}
            report["command"] = [sys.executable, "-m", "tlkeras.doctor", *argv]
            write_json(run_dir / REPORT, report)
            return report
    finally:
        log.removeHandler(handler)
        handler.close()


def _image_pass(parts, pixel_hashes: bool) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Per image: the near-constant share, a gallery thumbnail and (tfds) a pixel hash."""
    import tensorflow as tf

    shares, thumbs, hashes = [], [], []
    for ds in parts:
        for x, _ in ds:
            images = x.numpy()
            shares.append(constant_share(images))
            side = min(THUMBNAIL, images.shape[1])
            thumbs.append(tf.cast(tf.image.resize(x, (side, side), antialias=True), tf.uint8).numpy())
            if pixel_hashes:
                hashes += [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
    return np.concatenate(shares), np.concatenate(thumbs), (hashes if pixel_hashes else None)


def _report(cfg, info, names, roles, features, labels, shares, thumbs, pixel_hashes, run_dir: Path) -> dict[str, Any]:
    class_names = list(info.class_names)
    n = len(labels)
    settings = cfg.doctor

    # 1. Label errors.
    t = time.perf_counter()
    found = label_issues(features, labels, settings.folds, cfg.seed)
    label_s = time.perf_counter() - t
    if found["probe_accuracy"] is not None and found["probe_accuracy"] < WEAK_PROBE:
        log.warning(
            "doctor: the frozen features tell these classes apart poorly (probe accuracy %.2f): many of the %d "
            "'label' rows are hard images rather than wrong labels; review them before excluding them",
            found["probe_accuracy"],
            len(found["indices"]),
        )
    rows = [
        {
            "path": names[i],
            "issue": "label",
            "given": class_names[labels[i]],
            "suggested": class_names[found["suggested"][i]],
            "score": round(float(found["scores"][i]), 4),
        }
        for i in found["indices"]
    ]

    # 2. Duplicates: exact (content) and near (features), merged into groups.
    t = time.perf_counter()
    hashes = pixel_hashes if pixel_hashes is not None else file_hashes(names)
    near = near_duplicate_pairs(features, settings.near_duplicate_similarity)
    groups = _Groups(n)
    for group in exact_groups(hashes):
        for i in group[1:]:
            groups.join(i, group[0])
    pair_sims = {}
    for i, j, s in near:
        groups.join(i, j)
        pair_sims[i, j] = s
    merged = groups.groups()
    kinds = ["exact" if len({hashes[i] for i in g}) == 1 else "near" for g in merged]

    def similarity(group):  # the group's closest pair
        members = set(group)
        return max((s for (i, j), s in pair_sims.items() if i in members and j in members), default=1.0)

    duplicate_rows, duplicate_entries = _duplicate_rows(
        merged, kinds, names, roles, labels.tolist(), class_names, similarity
    )
    rows += duplicate_rows
    duplicate_s = time.perf_counter() - t

    # 3. Outliers: far from everything in feature space, or near-constant pixels.
    t = time.perf_counter()
    ood = outlier_scores(features)
    far = robust_low(ood, settings.outlier_deviations)
    constant = shares >= CONSTANT_SHARE
    outliers = []
    for i in np.nonzero(far | constant)[0]:
        reason = "near-constant image" if constant[i] else "far from every class in feature space"
        outliers.append({"path": names[i], "reason": reason, "ood_score": round(float(ood[i]), 4)})
        rows.append(
            {
                "path": names[i],
                "issue": "outlier",
                "given": class_names[labels[i]],
                "suggested": reason,
                "score": round(float(max(1.0 - ood[i], shares[i] if constant[i] else 0.0)), 4),
            }
        )
    outlier_s = time.perf_counter() - t

    # 4. Balance, on the images the probe saw (all splits) and on train.
    counts = np.bincount(labels, minlength=len(class_names))
    train_counts = np.bincount(labels[np.array(roles) == "train"], minlength=len(class_names))

    index = {name: i for i, name in enumerate(names)}
    _write_csv(run_dir / FLAGGED, rows)
    split_of = dict(zip(names, roles))
    galleries = {}
    for issue in ISSUES:
        chosen = [r for r in rows if r["issue"] == issue]
        if issue in ("label", "outlier"):
            chosen.sort(key=lambda r: -r["score"])
        else:  # whole groups, the kept image too, so each copy is seen beside its original
            flagged = {r["path"] for r in chosen}
            chosen = [
                {
                    "path": p,
                    "given": f"{class_names[labels[index[p]]]} ({split_of[p]})",
                    "suggested": "",
                    "score": e["similarity"],
                }
                for e in duplicate_entries
                if flagged & set(e["paths"])
                for p in e["paths"]
            ]
        chosen = chosen[: settings.gallery_images]
        if chosen:
            path = run_dir / f"gallery_{issue}.png"
            save_gallery([thumbs[index[r["path"]]] for r in chosen], chosen, issue, path)
            galleries[issue] = path.name
    conflicts = sum(len(e["classes"]) > 1 for e in duplicate_entries)
    leaks = sum(r["issue"] == "leak" for r in rows)
    summary = {
        "label_issues": len(found["indices"]),
        "duplicate_groups": len(duplicate_entries),
        "exact_duplicate_groups": kinds.count("exact"),
        "label_conflicts": conflicts,
        "leaks": leaks,
        "outliers": len(outliers),
        "flagged_files": len({r["path"] for r in rows}),
    }
    log.info(
        "doctor: %d likely label errors (probe accuracy %s), %d duplicate groups (%d exact, %d across classes), "
        "%d images leaking between splits, %d outliers; %d files flagged in %s",
        summary["label_issues"],
        "n/a" if found["probe_accuracy"] is None else f"{found['probe_accuracy']:.3f}",
        summary["duplicate_groups"],
        summary["exact_duplicate_groups"],
        conflicts,
        leaks,
        summary["outliers"],
        summary["flagged_files"],
        run_dir / FLAGGED,
    )
    return {
        "dataset": info.to_dict(),
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "images": n,
        "summary": summary,
        "label_issues": {
            "method": "cleanlab.filter.find_label_issues on out-of-fold probabilities of a linear probe",
            "folds": found["folds"],
            "seed": cfg.seed,
            "probe_accuracy": found["probe_accuracy"],
            "seconds": round(label_s, 1),
        },
        "duplicates": {
            "near_duplicate_similarity": settings.near_duplicate_similarity,
            "groups": duplicate_entries,
            "seconds": round(duplicate_s, 1),
        },
        "outliers": {
            "method": "cleanlab.outlier.OutOfDistribution (kNN in feature space), and near-constant pixels",
            "deviations": settings.outlier_deviations,
            "median_ood_score": round(float(np.median(ood)), 4),
            "items": outliers,
            "seconds": round(outlier_s, 1),
        },
        "balance": {
            **balance(dict(zip(class_names, counts.tolist()))),
            "train_counts": dict(zip(class_names, train_counts.tolist())),
        },
        "files": {"flagged": FLAGGED, "galleries": galleries},
        "exclude_with": f"--set data.exclude={run_dir / FLAGGED}",
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    from tlkeras.files import write_atomic

    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def save_gallery(images: list[np.ndarray], rows: list[dict], issue: str, path: Path) -> None:
    """A grid of the flagged images, each titled with its given and suggested labels."""
    import matplotlib

    from tlkeras.files import atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(8, len(images))
    lines = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(2.0 * columns, 2.3 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, row in zip(axes.flat, images, rows):
        ax.imshow(image)
        arrow = f"{row['given']} -> {row['suggested']}" if row["suggested"] else row["given"]
        ax.set_title(f"{arrow}\n{Path(row['path']).name[:22]} ({row['score']:.2f})", fontsize=7)
    fig.suptitle(f"{issue}: given -> suggested (score)", fontsize=10)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tlkeras.doctor", description=__doc__.split("\n")[0])
    add_config_arguments(parser, "data.dataset=./photos")
    parser.add_argument("--run-dir", type=Path, help="output folder (default runs/<time>-doctor-<name>)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        from tlkeras.config import load_config, preflight
        from tlkeras.rundir import default_run_dir

        cfg = load_config(args.config, args.overrides)
        run_dir = args.run_dir or default_run_dir(cfg, "doctor")
        preflight(cfg, run_dir)  # seconds, before TensorFlow and the data load
        quiet_libraries(args.debug)
        examine(cfg, run_dir, argv)
        print(f"wrote {run_dir / REPORT}, {run_dir / FLAGGED} and the galleries")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
