"""Errors a user can fix, and the one place that turns them into a one-line exit."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input; the message names the value and the fix."""

    exit_code = 1


class ConfigError(UserError):
    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], int | None], debug: bool) -> int:
    """Runs `main`, printing a UserError as one line (no traceback unless --debug)."""
    try:
        return main() or 0
    except UserError as e:
        if debug:
            raise
        logging.getLogger("tlkeras").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
