"""The documentation: the generated config reference, the keys the pages name, the strict build.

pytest -q -n 0 tests/test_docs.py
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlkeras.config import RENAMED, Config, to_flat_dict

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "config_table.py"
SECTIONS = ("data", "model", "head", "finetune", "runtime", "export", "evaluate")


def _hook():
    spec = importlib.util.spec_from_file_location("config_table", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_generated_table_lists_every_config_key_with_its_default():
    hook = _hook()
    table = hook.config_table()
    flat = to_flat_dict(Config())
    for key in flat:
        assert f"| `{key}` |" in table, f"{key} is missing from the generated config table"
    _, settings = hook.read_settings()
    assert [s.key for s in settings] == list(flat), "the table's keys differ from the config's"
    for s in settings:
        value = yaml.safe_load(s.default)
        if isinstance(flat[s.key], float):
            value = float(value)
        assert value == flat[s.key], f"{s.key}: the table says {s.default!r}, the code {flat[s.key]!r}"


def test_every_setting_has_a_description():
    """A new setting is a dataclass field with a comment: the comment is its documentation."""
    _, settings = _hook().read_settings()
    bare = [s.key for s in settings if not s.description]
    assert not bare, f"write a comment beside or above these fields in tlkeras/config.py: {bare}"


def test_configuration_page_keeps_the_marker():
    assert _hook().MARKER in (ROOT / "docs" / "configuration.md").read_text()


def test_docs_name_only_real_config_keys():
    """A renamed or removed setting must not live on in README.md or docs/."""
    keys = set(to_flat_dict(Config())) | set(RENAMED)  # the errors page quotes the refusal of an old name
    pattern = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_]+)(?![\w(/-]|\.\w)")
    # file names (model.keras, model.tflite, data.py), Keras's model.fit, and the misspelt key
    # of the unknown-key example
    files = ("py", "keras", "tflite", "onnx", "json", "csv", "png", "h5", "yaml", "npz", "txt")
    not_keys = {"model.fit", "data.batchsize"} | {f"{section}.{ext}" for section in SECTIONS for ext in files}
    wrong = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in pattern.finditer(page.read_text()):
            name = match.group(1)
            if name not in keys and name not in not_keys:
                wrong.append(f"{page.relative_to(ROOT)}: {name}")
    assert not wrong, "docs name config keys that do not exist:\n" + "\n".join(wrong)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "data.batch_size" in page and "config-table" not in page
