"""Accuracy against CPU minutes, one line per base: which base to train for a budget.

    python -m tlkeras.frontier runs/fr/* [--out frontier.png]

Reads each finished run folder (summary.json, config.yaml), prints one table row per run
(with runtime.time_budget_minutes, the wall time over the budget) and plots test accuracy
against end-to-end wall time (minutes), a panel per number of training images and a line
per base. Other paths (unfinished runs, files, damaged folders) are listed on stderr with
the reason and skipped.
The times are those of the machine each run was trained on (summary.json does not
know whether it was shared): compare runs made on one idle machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tlkeras.errors import ArgumentParser, UserError, run_cli
from tlkeras.rundir import DATASET, SUMMARY, atomic, check_run


def read_point(run_dir: Path) -> dict[str, Any]:
    """One run's point. Raises ValueError with the reason when `run_dir` is not a finished
    run folder (no summary.json: not finished) or its files are unreadable."""
    from tlkeras import rundir

    try:
        check_run(run_dir)
    except UserError as e:
        raise ValueError(str(e)) from None
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        cfg = rundir.load_run_config(run_dir)
        dataset = json.loads((run_dir / DATASET).read_text())
        return {
            "run": str(run_dir),
            "dataset": cfg.data.dataset,
            "backbone": cfg.model.backbone,
            "train_images": int(dataset["num_train"]),
            "resolution": cfg.model.resolution,
            "unfreeze": cfg.finetune.unfreeze if cfg.finetune.epochs else "none",
            "finetune_epochs": cfg.finetune.epochs,
            "minutes": round(float(summary["wall_time_s"]) / 60, 1),
            "test_accuracy": float(summary["test_accuracy"]),
            "budget_minutes": summary.get("time_budget_minutes"),  # runtime.time_budget_minutes
        }
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:  # JSON, YAML, missing keys
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"unreadable summary.json, config.yaml or dataset.json ({type(e).__name__}: {reason})"
        ) from None


def budget_column(point: dict[str, Any]) -> str:
    """'5 min, 1.02x' (the wall time over the budget) for a run with a time budget, else '-'."""
    budget = point["budget_minutes"]
    return f"{budget:g} min, {point['minutes'] / budget:.2f}x" if budget else "-"


def check_out(path: Path) -> None:
    """A PNG path whose folder exists and is writable, before any work is done."""
    if path.is_dir():
        raise UserError(f"--out '{path}' is a folder; give a file name such as {path / 'frontier.png'}")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--out '{path}': '{folder}' is not a writable folder; create it or choose another path")


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy vs minutes: a panel per training-set size, a line per base, each
    point labelled with its input size and unfreeze point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({p["train_images"] for p in points})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for backbone in sorted({p["backbone"] for p in points}):
            line = sorted(
                (p for p in points if p["train_images"] == size and p["backbone"] == backbone),
                key=lambda p: p["minutes"],
            )
            if not line:
                continue
            ax.plot([p["minutes"] for p in line], [p["test_accuracy"] for p in line], "o-", label=backbone)
            for p in line:
                ax.annotate(
                    f"{p['resolution']}px, {p['unfreeze']}",
                    (p["minutes"], p["test_accuracy"]),
                    fontsize=7,
                    xytext=(4, -10),
                    textcoords="offset points",
                )
        ax.margins(0.15)  # room for the point labels
        ax.set_title(f"{size:,} training images")
        ax.set_xlabel("wall time, minutes (2-core CPU)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument(
        "--out", type=Path, default=Path("frontier.png"), help="the PNG to write (default ./frontier.png)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)

    def run() -> None:
        check_out(args.out)
        points = []
        for run_dir in dict.fromkeys(args.runs):  # a run named twice is one point
            try:
                points.append(read_point(run_dir))
            except ValueError as e:
                print(f"skipped {run_dir}: {e}", file=sys.stderr)
        if not points:
            raise UserError(f"none of the {len(args.runs)} paths is a finished run folder (with summary.json)")
        print("| base | train images | input px | unfreeze | ft epochs | minutes | budget | test accuracy | run |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p in sorted(points, key=lambda p: (p["train_images"], p["backbone"], p["minutes"])):
            print(
                f"| {p['backbone']} | {p['train_images']} | {p['resolution']} | {p['unfreeze']} | "
                f"{p['finetune_epochs']} | {p['minutes']} | {budget_column(p)} | {p['test_accuracy']:.4f} | "
                f"{p['run']} |"
            )
        if len({p["dataset"] for p in points}) > 1:
            print(
                "warning: these runs trained on different datasets "
                f"({', '.join(sorted({p['dataset'] for p in points}))}); "
                f"their accuracies are not comparable",
                file=sys.stderr,
            )
        try:
            plot(points, args.out)
        except OSError as e:
            raise UserError(f"--out '{args.out}' could not be written ({e.strerror}); choose another path") from None
        print(f"wrote {args.out}")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
