"""A quiet console: TensorFlow's chatter hidden, real messages kept, TLKERAS_DEBUG=1 restores all."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlkeras import console

ROOT = Path(__file__).resolve().parents[1]
# What TF 2.21 printed on this CPU-only machine (see tlkeras/console.py); which of them a
# given machine prints depends on its build and hardware, so the test learns that first.
CHATTER = (*console.HARMLESS, "failed call to cuInit")
# Like a command: quiet first, then logging at INFO as train does, then TensorFlow at work,
# including tf.saved_model.save of a function with a named input (absl's renaming notice).
COMMAND = textwrap.dedent("""
    import logging, sys, warnings
    from tlkeras.console import quiet_libraries
    quiet_libraries()
    logging.basicConfig(level=logging.INFO)
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    module = tf.Module()
    module.v = tf.Variable(2.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([None], tf.float32, name="images")])
    tf.saved_model.save(module, sys.argv[1], signatures=module.f.get_concrete_function())
    logging.getLogger("tlkeras").warning("tlkeras speaks")
    warnings.warn("a real Python warning")
    print("oneDNN", _pywrap_util_port.IsMklEnabled())
""")
PLAIN = (
    "import tensorflow as tf; from tensorflow.python.util import _pywrap_util_port as p; "
    "tf.constant(1) + 1; print('oneDNN', p.IsMklEnabled())"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the knobs under test (conftest sets TF_CPP_MIN_LOG_LEVEL)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", console.DEBUG_ENV)}
    return {**env, **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stdout, stderr of: plain TensorFlow, a quiet command, the same with TLKERAS_DEBUG=1."""
    tmp = tmp_path_factory.mktemp("console")
    procs = {
        "plain": subprocess.Popen(
            [sys.executable, "-c", PLAIN],
            env=clean_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "quiet": subprocess.Popen(
            [sys.executable, "-c", COMMAND, str(tmp / "quiet")],
            env=clean_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "debug": subprocess.Popen(
            [sys.executable, "-c", COMMAND, str(tmp / "debug")],
            env=clean_env(TLKERAS_DEBUG="1"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    out = {name: p.communicate(timeout=120) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, out[name][1][-2000:]
    return out


def test_tensorflow_chatter_is_hidden_and_debug_brings_it_back(runs):
    seen = [c for c in CHATTER if c in runs["plain"][1]]
    if not seen:
        pytest.skip("this TensorFlow build prints no start-up chatter here")
    quiet, debug = runs["quiet"][1], runs["debug"][1]
    assert not [c for c in seen if c in quiet], quiet
    assert [c for c in seen if c not in debug] == [], debug


def test_library_logging_is_hidden_but_tlkeras_and_warnings_still_show(runs):
    quiet, debug = runs["quiet"][1], runs["debug"][1]
    for stderr in (quiet, debug):
        assert "tlkeras speaks" in stderr and "a real Python warning" in stderr
    assert "contains input name(s)" in debug and "contains input name(s)" not in quiet  # absl INFO
    assert "Assets written to" in debug and "Assets written to" not in quiet  # tensorflow INFO
    others = [
        line
        for line in quiet.splitlines()
        if line.strip() and "tlkeras speaks" not in line and "a real Python warning" not in line
    ]
    assert others == []


def test_onednn_stays_on(runs):
    assert runs["quiet"][0].strip() == runs["plain"][0].strip()  # "oneDNN True" on x86 builds


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean_env(), "PYTHONPATH": f"{tmp_path}:{ROOT}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_other_lines_printed_during_the_import_are_replayed(tmp_path):
    (tmp_path / "noisy.py").write_text(
        textwrap.dedent(f"""
        import os, sys
        os.write(2, b"WARNING: {console.HARMLESS[0]}\\n")  # straight to fd 2, as absl does
        os.write(2, b"E0000 something really went wrong\\n")
        print("a Python line on stderr", file=sys.stderr)
        if os.environ.get("FAIL"):
            raise ImportError("noisy cannot load")
    """)
    )
    ok = run_python("from tlkeras.console import import_quietly; import_quietly('noisy'); print('imported')", tmp_path)
    assert ok.returncode == 0 and ok.stdout == "imported\n"
    assert ok.stderr == "E0000 something really went wrong\na Python line on stderr\n"

    (tmp_path / "noisy.py").write_text((tmp_path / "noisy.py").read_text().replace('os.environ.get("FAIL")', "True"))
    failed = run_python("from tlkeras.console import import_quietly; import_quietly('noisy')", tmp_path)
    assert failed.returncode == 1
    assert "something really went wrong" in failed.stderr and "ImportError: noisy cannot load" in failed.stderr
    assert console.HARMLESS[0] not in failed.stderr


@pytest.fixture
def saved_levels():
    levels = {name: logging.getLogger(name).level for name in console.LIBRARY_LEVELS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_explicit_log_level_respected_and_debug_changes_nothing(monkeypatch, saved_levels):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    console.quiet_libraries()  # TensorFlow is imported already (conftest): nothing to capture
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert logging.getLogger("absl").level == logging.WARNING
    assert logging.getLogger("tensorflow").level == logging.ERROR

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    logging.getLogger("absl").setLevel(logging.NOTSET)
    for debug, env in ((True, ""), (False, "1"), (False, "yes")):
        monkeypatch.setenv(console.DEBUG_ENV, env)
        console.quiet_libraries(debug)
        assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and logging.getLogger("absl").level == logging.NOTSET
    monkeypatch.setenv(console.DEBUG_ENV, "0")
    console.quiet_libraries()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == console.TF_LOG_LEVEL
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ or os.environ["TF_ENABLE_ONEDNN_OPTS"] != "0"


class FakeClock:
    """A clock the test moves by hand: no sleeps."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_a_line_every_period_with_counts_and_rates(caplog):
    caplog.set_level(logging.INFO, logger="tlkeras")
    clock = FakeClock()
    progress = console.Progress("test pass", total=1000, every_s=20, terminal=False, clock=clock)
    for _ in range(100):  # 100 batches of 10 images, 1 s each: a line per 20 s, not per batch
        clock.now += 1
        progress.add(10)
    assert progress.done() == 100
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "test pass: 200/1000 images (20%), 10.0 images/s"
    assert len(lines) == 5  # at 20, 40, 60, 80 s, and the last line
    assert lines[-1] == "test pass: 1000 images in 100 s, 10.0 images/s"


def test_progress_tracks_an_iterable_of_unknown_length_and_a_short_step_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="tlkeras")
    clock = FakeClock()
    progress = console.Progress("scan", total=None, unit="files", terminal=False, clock=clock)

    def slow(items):
        for item in items:
            clock.now += 25
            yield item

    assert list(progress.track(slow(range(100)), size=lambda i: 10)) == list(range(100))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "scan: 10 files, 0.4 files/s"  # unknown total: no share
    assert len(lines) == 101 and lines[-1] == "scan: 1000 files in 2500 s, 0.4 files/s"
    caplog.clear()
    quick = console.Progress("features", total=8, terminal=False, clock=FakeClock())
    quick.add(8)
    quick.done()
    assert not caplog.records  # seconds: no line at all


def test_progress_on_a_terminal_is_the_keras_bar(capsys):
    progress = console.Progress("export version 1", 3, "stages", rate=False, terminal=True)
    for note in ("SavedModel written", "ONNX converted", "parity checked"):
        progress.add(note=note)
    progress.done()
    out = capsys.readouterr().out
    assert out.startswith("export version 1:\n") and "3/3" in out
