"""Accuracy against CPU minutes, one line per base: which base to train for a budget.

    python -m tlkeras.frontier runs/fr/* [--out frontier.png]

Reads each finished run folder (summary.json, config.yaml), prints one table row per run
and plots test accuracy against end-to-end wall time (minutes), a panel per number of
training images and a line per base. Runs that are not finished are listed and skipped.
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


def read_point(run_dir: Path) -> dict[str, Any] | None:
    """One run's point, or None when the run has no summary.json (not finished)."""
    from tlkeras.config import load_config

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    cfg = load_config(run_dir / "config.yaml")
    return {
        "run": str(run_dir),
        "backbone": cfg.model.backbone,
        "train_images": summary["dataset"]["num_train"],
        "image_size": cfg.model.image_size,
        "unfreeze": cfg.finetune.unfreeze if cfg.finetune.epochs else "none",
        "finetune_epochs": cfg.finetune.epochs,
        "minutes": round(summary["wall_time_s"] / 60, 1),
        "test_accuracy": summary["test_accuracy"],
    }


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
            line = sorted((p for p in points if p["train_images"] == size and p["backbone"] == backbone),
                          key=lambda p: p["minutes"])  # fmt: skip
            if not line:
                continue
            ax.plot([p["minutes"] for p in line], [p["test_accuracy"] for p in line], "o-", label=backbone)
            for p in line:
                ax.annotate(f"{p['image_size']}px, {p['unfreeze']}", (p["minutes"], p["test_accuracy"]),
                            fontsize=7, xytext=(4, -10), textcoords="offset points")  # fmt: skip
        ax.margins(0.15)  # room for the point labels
        ax.set_title(f"{size:,} training images")
        ax.set_xlabel("wall time, minutes (2-core CPU)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, default=Path("frontier.png"), help="the PNG to write")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)

    def run() -> None:
        points = []
        for run_dir in args.runs:
            if not run_dir.is_dir():
                continue  # a shell glob also yields the runs' log files
            point = read_point(run_dir)
            if point is None:
                print(f"skipped {run_dir}: not finished (no summary.json)", file=sys.stderr)
            else:
                points.append(point)
        if not points:
            raise UserError(f"none of the {len(args.runs)} paths is a finished run folder (with summary.json)")
        print("| base | train images | input px | unfreeze | ft epochs | minutes | test accuracy | run |")
        print("|---|---|---|---|---|---|---|---|")
        for p in sorted(points, key=lambda p: (p["train_images"], p["backbone"], p["minutes"])):
            print(f"| {p['backbone']} | {p['train_images']} | {p['image_size']} | {p['unfreeze']} | "
                  f"{p['finetune_epochs']} | {p['minutes']} | {p['test_accuracy']:.4f} | {p['run']} |")  # fmt: skip
        plot(points, args.out)
        print(f"wrote {args.out}")

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
