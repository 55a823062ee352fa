"""A quiet console: every command's `main()` calls quiet_libraries() right after parsing.

    quiet_libraries(args.debug)        # before anything imports TensorFlow
    TLKERAS_DEBUG=1 python -m tlkeras.train ...   # or --debug: every library line is back

What a command printed before (TF 2.21, tfds 4.9, tf2onnx 1.17; CPU machine) and how each
line is hidden:
- During `import tensorflow`, twice (two of TF's shared libraries each carry absl):
  "WARNING: All log messages before absl::InitializeLog() is called are written to
  STDERR", "I... port.cc] oneDNN custom operations are on...", "I... cudart_stub.cc]
  Could not find cuda drivers on your machine...". absl writes them straight to fd 2
  before TF's logging exists, so TF_CPP_MIN_LOG_LEVEL cannot hide them
  (tensorflow/tensorflow#37689, #100442). Hidden by pointing fd 2 at a temporary file
  for the import only; afterwards every captured line not on HARMLESS is replayed, so
  a real import problem is still seen.
- "I... cpu_feature_guard.cc] This TensorFlow binary is optimized..." (two lines), later
  in the import: obeys TF_CPP_MIN_LOG_LEVEL, and is on HARMLESS.
- "E... cuda_platform.cc] failed call to cuInit: ... UNKNOWN ERROR (303)" when the first
  op sets up the devices, after the import: TF_CPP_MIN_LOG_LEVEL=3.
- C++ INFO/WARNING later on: tf2onnx's grappler pass ("devices.cc] Number of eligible
  GPUs", "single_machine.cc] Starting new session"), tf.data ("tf_record_dataset_op.cc]
  The default buffer size", "cache_dataset_ops.cc] The calling iterator did not fully
  read", "generator_dataset_op.cc] Memory patch applied"), "mlir_graph_optimization_pass
  .cc] MLIR V1 optimization pass is not enabled": TF_CPP_MIN_LOG_LEVEL >= 2.
- Python logging, shown because training logs at INFO: absl INFO from
  tf.saved_model.save ("Function `serve_bytes` contains input name(s) ... will be renamed
  ...", hundreds of characters), tensorflow INFO/WARNING ("Assets written to",
  "Restoring parameters from", "load (from tensorflow.python.saved_model.loader_impl) is
  deprecated"), tfds via absl ("Load dataset info from", "Constructing tf.data.Dataset"),
  tf2onnx INFO ("Using tensorflow=...", "Optimizing ONNX model"): the library loggers in
  LIBRARY_LEVELS.
oneDNN itself stays on (TF_ENABLE_ONEDNN_OPTS is never touched): bfloat16 speed needs it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile

DEBUG_ENV = "TLKERAS_DEBUG"
# 3 hides C++ ERROR lines too: the only ones seen are the cuInit failure of CPU-only
# machines; real TF failures still arrive as Python exceptions.
TF_LOG_LEVEL = "3"
# Start-up lines known to be harmless (substrings), dropped from what fd 2 received during
# `import tensorflow`; anything else captured there is replayed.
HARMLESS = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "rebuild TensorFlow with the appropriate compiler flags",  # the second line of the above
    # LiteRT: the converter's quantization summary and the interpreter's CPU delegate note
    "fully_quantize: ",
    "Created TensorFlow Lite XNNPACK delegate for CPU",
)
LIBRARY_LEVELS = {
    "tensorflow": logging.ERROR,  # deprecation and retracing notes: for tlkeras's developers
    "absl": logging.WARNING,  # tfds and tf.saved_model log through absl
    "tensorflow_datasets": logging.WARNING,
    "tf2onnx": logging.WARNING,
    "h5py": logging.WARNING,
    "PIL": logging.WARNING,  # PNG chunk DEBUG lines when the root logger is at DEBUG
    "matplotlib": logging.WARNING,
    "urllib3": logging.ERROR,  # a failed download's retries: the one error line says it all
}


def debug_requested(flag: bool = False) -> bool:
    """True with --debug or TLKERAS_DEBUG set to anything but '', '0', 'false', 'no'."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_libraries(debug: bool = False) -> None:
    """Hides the start-up and progress chatter of TensorFlow and friends; keeps real errors.

    Call it first in main(), before TensorFlow is imported: it sets TF_CPP_MIN_LOG_LEVEL
    (to 3, unless the user set it: an explicit value is respected), imports TensorFlow
    with fd 2 captured (see the module docstring) and sets the library loggers of
    LIBRARY_LEVELS; tlkeras's own logging and Python warnings are untouched. If
    TensorFlow is already imported, only the loggers and later C++ lines can be quieted.
    With debug (--debug) or TLKERAS_DEBUG=1 it does nothing at all.
    """
    if debug_requested(debug):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    import_quietly("tensorflow")
    # After the import: absl must create its own "absl" logger (a subclass) first.
    for name, level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(level)


def import_quietly(module: str) -> None:
    """Imports `module` under native_stderr_filtered (see there)."""
    if module in sys.modules:
        return
    with native_stderr_filtered():
        importlib.import_module(module)


@contextlib.contextmanager
def native_stderr_filtered():
    """Runs the block with fd 2 sent to a temporary file, then replays the captured lines
    that match no HARMLESS pattern (also when the block fails): C++ libraries write their
    notes straight to fd 2, past Python's logging. Off with --debug / TLKERAS_DEBUG.

    A file, not a pipe: nothing reads a pipe during the block, and a full one would
    block the writer. Only fd 2 of this process is touched, and only for the block.
    """
    sys.stderr.flush()
    try:
        saved = None if debug_requested() else os.dup(2)
    except OSError:  # no fd 2 at all (a daemon): nothing to keep quiet
        saved = None
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(p in line for p in HARMLESS))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


# ----------------------------------------------------------------------------- progress


class Progress:
    """Progress of one long step, the way Keras users expect it: keras.utils.Progbar on a
    terminal (as fit draws it), else a log line every `every_s` seconds with the count, the
    share done and the rate, and a last line when the step took that long. Never a line
    per batch in a log.

        progress = Progress("test pass", total=info.num_test, unit="images")
        for x, y in dataset:
            ...
            progress.add(len(y))
        progress.done()

    or `for item in Progress(...).track(iterable)`. `total` None: unknown. rate=False for
    steps whose rate means nothing (the export's three stages). `clock` and `terminal`
    are for tests (a fake clock; False forces log lines).
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        unit: str = "images",
        every_s: float = 20.0,
        rate: bool = True,
        terminal: bool | None = None,
        clock=None,
    ):
        import time

        self.what, self.total, self.unit, self.every_s, self.rate = what, total, unit, every_s, rate
        self.clock = clock or time.monotonic
        self.count = 0
        self.start = self.last = self.clock()
        self.bar = None
        if sys.stdout.isatty() if terminal is None else terminal:
            import keras

            print(f"{what}:", flush=True)
            self.bar = keras.utils.Progbar(total, unit_name=unit)

    def add(self, n: int = 1, note: str = "") -> None:
        """Counts `n` more done; `note` (e.g. the stage just finished) ends the log line."""
        self.count += n
        if self.bar is not None:
            self.bar.update(self.count)
            return
        now = self.clock()
        if now - self.last >= self.every_s and (self.total is None or self.count < self.total):
            self.last = now
            logging.getLogger("tlkeras").info("%s: %s%s", self.what, self.line(now), f"; {note}" if note else "")

    def line(self, now: float) -> str:
        """'120/500 images (24%), 3.1 images/s' (no share when the total is unknown)."""
        seconds = max(now - self.start, 1e-9)
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        of = f"/{self.total}" if self.total is not None else ""
        speed = f", {self.count / seconds:.1f} {self.unit}/s" if self.rate else f", {seconds:.0f} s"
        return f"{self.count}{of} {self.unit}{share}{speed}"

    def done(self) -> float:
        """Ends the bar, or logs the last line when the step took `every_s` or more;
        returns the step's seconds."""
        seconds = self.clock() - self.start
        if self.bar is not None:
            self.bar.update(self.count, finalize=True)
        elif seconds >= self.every_s:
            speed = f", {self.count / max(seconds, 1e-9):.1f} {self.unit}/s" if self.rate else ""
            logging.getLogger("tlkeras").info("%s: %d %s in %.0f s%s", self.what, self.count, self.unit, seconds, speed)
        return seconds

    def track(self, iterable, size=None):
        """Yields the items of `iterable`, counting `size(item)` (1 without `size`) after
        each, and ends with done()."""
        for item in iterable:
            yield item
            self.add(size(item) if size else 1)
        self.done()
