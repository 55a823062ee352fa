"""Fault injection on a real training run: kill -9s, SIGTERMs and a full disk, then checks.

    python -m tlkeras.faults --config configs/cpu_10pct.yaml --out runs/faults \\
        --kills 20 --sigterms 5 [--reference runs/faults/reference] [--set KEY=VALUE ...]

Runs the recipe once without faults (the reference; reused when --reference names a finished
run), then trains it again in `<out>/killed` and SIGKILLs the process at `--kills` seeded random
moments, each aimed at a stage still ahead (feature computation, phase-1 epochs, a checkpoint or
backup write, phase-2 steps, the export), rerunning the same command each time; then the same
with SIGTERM in `<out>/sigterm` (exit status 143 within 30 s expected); then a full disk: the
run folder on a small tmpfs (root only; else it says so: the simulated ENOSPC cases are in
tests/test_errors.py), freed by a remount, and the same command rerun.

Reported per kill: the stage, the seconds of work lost (from the newest durable file of the run
folder, or the process start if later, to the kill). At the end, for each run folder: every
epoch once in metrics.csv, summary.json present, model.keras loads, every export version
complete and within the parity tolerance, test accuracy within noise of the reference.
The report is printed and written to <out>/faults.json.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tlkeras.console import quiet_libraries
from tlkeras.errors import ArgumentParser, ConfigError, UserError, run_cli

STAGES = ("features", "head", "write", "finetune", "export")
DURABLE = (
    "backup/*/latest.weights.h5",
    "checkpoints/*",
    "features/*.json",
    "metrics.csv",
    "model.keras",
    "export/*/[0-9]*",
    "summary.json",
)


class Trainer:
    """Starts `python -m tlkeras.train` on one run folder, output appended to <folder>.out."""

    def __init__(self, run_dir: Path, train_args: list[str], out: Path | None = None):
        self.run_dir, self.args = run_dir, train_args
        self.out = out or run_dir.with_name(run_dir.name + ".out")
        self.log_start = 0  # train.log is appended to: only what the current process wrote counts

    def start(self) -> subprocess.Popen:
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        out = self.out.open("a")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.log_start = len(self.log(all_of_it=True))
        cmd = [sys.executable, "-m", "tlkeras.train", "--run-dir", str(self.run_dir), *self.args]
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self, all_of_it: bool = False) -> str:
        path = self.run_dir / "train.log"
        text = path.read_text() if path.exists() else ""
        return text if all_of_it else text[self.log_start :]

    def stderr_tail(self, lines: int = 5) -> list[str]:
        text = self.out.read_text()
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def stages_left(self) -> list[str]:
        done = lambda phase: (self.run_dir / "checkpoints" / f"{phase}.json").exists()  # noqa: E731
        if (self.run_dir / "summary.json").exists():
            return []
        if done("finetune"):
            return ["export"]
        if done("head"):
            return ["write", "finetune", "export"]
        return list(STAGES)


def newest_durable(run_dir: Path) -> float:
    times = [p.stat().st_mtime for pattern in DURABLE for p in run_dir.glob(pattern)]
    return max(times, default=0.0)


def wait_for(proc: subprocess.Popen, ready, timeout: float) -> bool:
    """Polls `ready()` every 20 ms while the process runs; False if it exited or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.02)
    return False


def aim(trainer: Trainer, proc: subprocess.Popen, stage: str, rng: random.Random, ref: dict[str, float]) -> bool:
    """Waits until the process is inside `stage`, plus a random part of it; False if it ended
    first or the stage did not come in time (the caller then signals it where it is)."""
    run = trainer.run_dir
    patience = 3 * ref["total"] + 60  # a busy machine runs slower than the reference did
    if stage == "write":  # a temporary file of a backup or a checkpoint: mid-write
        return wait_for(proc, lambda: any(run.glob("backup/*/.tmp-*")) or any(run.glob("checkpoints/.tmp-*")), patience)
    marker = {
        "features": "head: epochs",
        "head": "head: features of",
        "finetune": "finetune: epochs",
        "export": "final weights sha256",
    }[stage]
    if stage == "head":  # the features may come from the cache
        ok = wait_for(proc, lambda: marker in trainer.log() or "reused from" in trainer.log(), patience)
    else:
        ok = wait_for(proc, lambda: marker in trainer.log(), patience)
    if not ok:
        return False
    delay = rng.uniform(0, max(ref.get(stage, 10.0) / 3, 1.0))
    return not wait_for(proc, lambda: False, delay) and proc.poll() is None


def stage_times(log: str) -> dict[str, float]:
    """Seconds each stage took in an uninterrupted run's train.log."""
    import datetime

    def at(text):
        for line in log.splitlines():
            if text in line:
                return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    marks = [
        at(m)
        for m in (
            "starting run",
            "head: epochs",
            "head: features of",
            "finetune: epochs",
            "final weights sha256",
            "test accuracy",
        )
    ]
    names = ("startup", "features", "head", "finetune", "export")
    times = {n: b - a for n, a, b in zip(names, marks, marks[1:]) if a and b}
    times["total"] = (marks[-1] or 0) - (marks[0] or 0)
    return times


def inject(trainer: Trainer, count: int, sig: int, rng: random.Random, ref: dict[str, float]) -> list[dict]:
    """`count` signals at aimed moments, rerunning after each; the last start runs to the end."""
    trials = []
    for i in range(count):
        left = trainer.stages_left()
        if not left:
            break
        stage = rng.choice(left)
        proc, launched = trainer.start(), time.time()
        if not aim(trainer, proc, stage, rng, ref) and proc.poll() is not None:
            trials.append({"trial": i + 1, "stage": stage, "landed": False, "exit": proc.returncode})
            print(json.dumps(trials[-1]), flush=True)
            continue
        durable = newest_durable(trainer.run_dir)
        sent = time.time()
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        trial = {
            "trial": i + 1,
            "stage": stage,
            "landed": True,
            "exit": code,
            "exit_s": round(time.time() - sent, 1),
            "lost_s": round(sent - max(durable, launched), 1),
        }
        if sig == signal.SIGTERM:
            trial["message"] = trainer.stderr_tail(1)[0][:300]
        trials.append(trial)
        print(json.dumps(trial), flush=True)
    if not (trainer.run_dir / "summary.json").exists():
        trials.append({"final_exit": trainer.start().wait()})
    return trials


def check(run_dir: Path, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Every epoch once, summary, model.keras, complete parity-checked exports, accuracy."""
    import csv

    import keras
    import numpy as np

    from tlkeras import model as _  # noqa: F401  registers the preprocessing layers for load_model
    from tlkeras import rundir
    from tlkeras.export import TOLERANCE, run_onnx, run_tf1_session
    from tlkeras.model import fold_temperature

    cfg = rundir.load_run_config(run_dir)
    with (run_dir / "metrics.csv").open() as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f)]
    result: dict[str, Any] = {
        "epochs_once": epochs == list(range(cfg.head.epochs + cfg.finetune.epochs)),
        "summary": (run_dir / "summary.json").is_file(),
    }
    summary = rundir.read_json(run_dir / "summary.json") or {}
    model = keras.models.load_model(run_dir / "model.keras")
    info = rundir.load_dataset(run_dir)
    images = np.random.default_rng(0).integers(0, 256, (16, info.storage_size, info.storage_size, 3), dtype=np.uint8)
    # Exports answer softmax(logits / T) with the run's fitted temperature folded in
    # (model.fold_temperature): compare each with the model calibrated the same way.
    temperatures = {str(r["version"]): r.get("temperature") or 1.0 for r in summary.get("exports", [])}
    exports = []
    base = Path(cfg.export.base or run_dir / "export")
    for version in sorted((base / cfg.export.name).glob("*")) if cfg.export.enabled else []:
        onnx = base / "onnx" / cfg.export.name / version.name / "model.onnx"
        ok = version.name.isdigit() and onnx.is_file() and (version / "saved_model.pb").is_file()
        diff = None
        if ok:
            t = temperatures.get(version.name, 1.0)
            expected = (fold_temperature(model, t) if t != 1.0 else model).predict(images, verbose=0)
            diff = max(
                float(np.abs(run_tf1_session(version, images)["probabilities"] - expected).max()),
                float(np.abs(run_onnx(onnx, images)["probabilities"] - expected).max()),
            )
        exports.append(
            {"version": version.name, "complete": ok, "max_abs_diff": diff, "parity": ok and diff <= TOLERANCE}
        )
    result["exports"] = exports
    result["exports_ok"] = bool(exports) == cfg.export.enabled and all(e["parity"] for e in exports)
    result["test_accuracy"] = summary.get("test_accuracy")
    if reference and result["test_accuracy"] is not None:
        p, n = reference["test_accuracy"], reference["test_examples"]
        noise = 3 * math.sqrt(p * (1 - p) / n) + 0.01  # 3 sigma of the test sample, plus seed noise
        result["reference_test_accuracy"] = p
        result["accuracy_within_noise"] = abs(result["test_accuracy"] - p) <= noise
    result["intact"] = result["epochs_once"] and result["summary"] and result["exports_ok"]
    return result


def full_disk(out: Path, train_args: list[str], reference_dir: Path, reference: dict) -> dict[str, Any]:
    """The run folder on a tmpfs of a third of the reference run's size, then remounted larger."""
    mount = out / "disk"
    mount.mkdir(parents=True, exist_ok=True)
    need = sum(p.stat().st_size for p in reference_dir.rglob("*") if p.is_file())
    small = max(need // 3, 20 * 2**20)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={small}", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        return {
            "kind": "not run: tmpfs not mountable here (needs root); simulated ENOSPC is "
            "covered by tests/test_errors.py::test_full_disk_*"
        }
    try:
        trainer = Trainer(mount / "run", train_args, out=out / "disk.out")  # the output outlives the tmpfs
        first = trainer.start().wait()
        tail = trainer.stderr_tail(3)
        result = {
            "kind": f"tmpfs of {small / 2**20:.0f} MiB (the reference run folder: {need / 2**20:.0f} MiB)",
            "exit": first,
            "line": tail[-1][:300],
            "one_line": tail[-1].startswith("error: ") and "Traceback" not in "\n".join(tail),
        }
        subprocess.run(["mount", "-o", f"remount,size={3 * need}", str(mount)], check=True)
        result["rerun_exit"] = trainer.start().wait()
        result["check"] = check(trainer.run_dir, reference)
        return result
    finally:
        subprocess.run(["umount", str(mount)])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference and faulty runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=5)
    parser.add_argument("--no-full-disk", action="store_true")
    parser.add_argument("--reference", type=Path, help="a finished uninterrupted run of the same settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    return run_cli(lambda: inject_all(args), args.debug)


def inject_all(args) -> int:
    from tlkeras.config import load_config, preflight

    if args.kills < 0 or args.sigterms < 0:
        raise ConfigError(f"--kills {args.kills} / --sigterms {args.sigterms}: counts must be 0 or more")
    if args.reference and not (args.reference / "summary.json").is_file():
        raise UserError(
            f"--reference '{args.reference}' is not a finished run (no summary.json); "
            f"drop it to train a reference in <out>/reference"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out '{args.out}' is a file; give a folder for the runs")
    cfg = load_config(args.config, args.overrides)  # a bad config: one line now, not after a failed run
    preflight(cfg, args.out / "reference")
    quiet_libraries(args.debug)  # the checks below load TensorFlow: no start-up chatter
    train_args = ["--config", args.config, *[a for kv in args.overrides for a in ("--set", kv)]]
    rng = random.Random(args.seed)

    ref_dir = args.reference or args.out / "reference"
    if not (ref_dir / "summary.json").exists():
        print(f"reference run in {ref_dir}", flush=True)
        if Trainer(ref_dir, train_args).start().wait():
            print(f"the reference run failed; see {ref_dir}.out", file=sys.stderr)
            return 1
    reference = json.loads((ref_dir / "summary.json").read_text())
    ref = stage_times((ref_dir / "train.log").read_text())
    report: dict[str, Any] = {
        "reference": {"dir": str(ref_dir), "stage_s": ref, "test_accuracy": reference["test_accuracy"]}
    }
    for name, sig, count in (("killed", signal.SIGKILL, args.kills), ("sigterm", signal.SIGTERM, args.sigterms)):
        if count:
            trainer = Trainer(args.out / name, train_args)
            trials = inject(trainer, count, sig, rng, ref)
            report[name] = {"trials": trials, "check": check(trainer.run_dir, reference)}
    if not args.no_full_disk:
        report["full_disk"] = full_disk(args.out, train_args, ref_dir, reference)

    kills = [t for t in report.get("killed", {}).get("trials", []) if t.get("landed")]
    terms = [t for t in report.get("sigterm", {}).get("trials", []) if t.get("landed")]
    report["totals"] = {
        "kills_landed": len(kills),
        "max_lost_s": max((t["lost_s"] for t in kills), default=None),
        "mean_lost_s": round(sum(t["lost_s"] for t in kills) / len(kills), 1) if kills else None,
        "sigterms_landed": len(terms),
        # -15: the signal came before the handlers were installed (TensorFlow still importing):
        # the default action, which a shell or a scheduler also reports as 143.
        "sigterm_exit_143_within_30s": all(t["exit"] in (143, -15) and t["exit_s"] <= 30 for t in terms),
        "corrupted_run_folders": sum(not report[k]["check"]["intact"] for k in ("killed", "sigterm") if k in report)
        + int("check" in report.get("full_disk", {}) and not report["full_disk"]["check"]["intact"]),
    }
    (args.out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["totals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
