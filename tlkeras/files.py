"""Files written so that a kill or a full disk never leaves a half-written one.

with atomic(path) as tmp:   # write tmp; renamed over path when the block succeeds
    np.savez(tmp, ...)
write_json(path, {"a": 1})
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlkeras.errors import writing


@contextmanager
def atomic(path: Path, what: str | None = None, needed_bytes: int = 0) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renamed over `path` when the block
    succeeds (a block that wrote nothing leaves `path` as it was), removed when it fails. A
    kill or a full disk mid-write never leaves a half-written file under `path` (the
    previous one stays). The temporary name keeps the
    whole file name as its ending (`.tmp-<pid>-model.weights.h5`), for writers that pick a
    format by it. Raises UserError naming `what` (default: the file's name) when the disk
    is full or failing (errors.writing)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with writing(path, what or f"'{path.name}'", needed_bytes):
        try:
            yield tmp
            if tmp.exists():
                os.replace(tmp, path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with atomic(path, needed_bytes=len(text.encode())) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
