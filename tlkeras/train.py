"""Train a classifier from an ImageNet base (VGG16 or MobileNetV2) in two phases, and export it.

    python -m tlkeras.train [--config FILE] [--run-dir DIR | --resume] [--set KEY=VALUE ...]

Rerunning the same command with the same --run-dir resumes an interrupted run; with
--resume instead, it resumes the latest unfinished run under runs/ with the same config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tlkeras.config import add_config_arguments
from tlkeras.console import quiet_libraries
from tlkeras.errors import ArgumentParser, run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tlkeras.train", description=__doc__.split("\n")[0])
    add_config_arguments(parser, "head.epochs=3")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path, help="run folder (default runs/<time>-<name>)")
    where.add_argument(
        "--resume",
        action="store_true",
        help="resume the latest unfinished run under runs/ (no summary.json) whose config equals this "
        "command's (same --config and --set); a finished run is never reused; with none, start a new run",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a time budget counts from here: TensorFlow's import is in it
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        from tlkeras.config import load_config, preflight
        from tlkeras.rundir import default_run_dir

        cfg = load_config(args.config, args.overrides)
        run_dir = args.run_dir or (resumable(cfg) if args.resume else None) or default_run_dir(cfg)
        preflight(cfg, run_dir)  # seconds, before TensorFlow and the data load
        quiet_libraries(args.debug)  # imports TensorFlow with its start-up lines hidden
        from tlkeras.errors import UserError
        from tlkeras.resume import Preempted
        from tlkeras.rundir import remove_if_unstarted
        from tlkeras.training import train_and_evaluate

        created = not run_dir.exists()
        parent_created = not run_dir.parent.exists()  # runs/ on a first try
        try:
            train_and_evaluate(cfg, run_dir, argv, started)
        except UserError as e:
            # Bad data or weights, or a stop, before any training: leave no folder behind,
            # and then a stop's hint must not name it.
            removed = created and remove_if_unstarted(run_dir)
            if removed and parent_created and not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()
            if removed and isinstance(e, Preempted):
                raise e.nothing_saved() from None
            raise

    return run_cli(run, args.debug)


def resumable(cfg) -> Path | None:
    """--resume: the run folder to continue (rundir.find_unfinished), said in one line."""
    from tlkeras.rundir import find_unfinished

    found = find_unfinished(cfg)
    if found:
        logging.getLogger("tlkeras").info("--resume: continuing the unfinished run in %s (same config)", found)
    else:
        logging.getLogger("tlkeras").info(
            "--resume: no unfinished run with this config under runs/; starting a new one"
        )
    return found


if __name__ == "__main__":
    sys.exit(main())
