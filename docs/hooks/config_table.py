"""MkDocs hook: the configuration reference table, generated from tlkeras/config.py.

    mkdocs build --strict        # mkdocs.yml lists this file under `hooks:`

The dataclasses in tlkeras/config.py are the one description of every setting: their
defaults, and the comments beside or above each field. This hook reads that source with
`ast` and `tokenize` (no TensorFlow import, no tlkeras import) and replaces the marker
`<!-- config-table -->` in docs/configuration.md with one table per section, so the
reference cannot drift from the code. `config_table()` is also what tests/test_docs.py
checks.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

MARKER = "<!-- config-table -->"
PAGE = "configuration.md"
CONFIG_PY = Path(__file__).resolve().parents[2] / "tlkeras" / "config.py"
ROOT_CLASS = "Config"


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, e.g. data.batch_size
    kind: str  # the annotation as written, e.g. int | None
    default: str  # as a YAML value: null, true, cifar10, 1e-3
    description: str  # the field's comments, joined


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text per line, and the lines that hold nothing but a comment."""
    text, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            text[line] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                alone.add(line)
    return text, alone


def _default(node: ast.expr | None, source: str) -> str:
    if node is None:
        return ""
    if isinstance(node, ast.Constant):
        if node.value is None:
            return "null"
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
        if isinstance(node.value, str):
            return node.value
    if isinstance(node, ast.Name):  # a module-level constant, e.g. AUTO = "auto"
        for statement in ast.parse(source).body:
            target = getattr(statement, "target", None) or (getattr(statement, "targets", None) or [None])[0]
            if getattr(target, "id", None) == node.id and isinstance(statement.value, ast.Constant):
                return _default(statement.value, source)
    return (ast.get_source_segment(source, node) or "").replace("_", "")


def _factory(node: ast.expr | None) -> str | None:
    """The class name of `field(default_factory=SomeConfig)`, else None."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        for kw in node.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                return kw.value.id
    return None


def _fields(cls: ast.ClassDef, source: str, comments: dict[int, str], alone: set[int]):
    """(name, annotation, default node, description, had a comment block above) per field."""
    out = []
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and n not in alone]
        text = " ".join(above + beside)
        out.append((stmt.target.id, ast.get_source_segment(source, stmt.annotation), stmt.value, text, bool(above)))
    return out


def read_settings(path: Path = CONFIG_PY) -> tuple[list[tuple[str, str]], list[Setting]]:
    """The sections (prefix, the dataclass's docstring) and every setting, in source order."""
    source = path.read_text()
    tree = ast.parse(source)
    comments, alone = _comments(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sections, settings = [], []

    def walk(name: str, prefix: str) -> None:
        cls = classes[name]
        sections.append((prefix, ast.get_docstring(cls) or ""))
        head = None  # (key, name) of the field whose comment block the next fields may share
        nested = []
        for field_name, kind, value, text, block in _fields(cls, source, comments, alone):
            key = f"{prefix}.{field_name}" if prefix else field_name
            child = _factory(value)
            if child in classes:
                nested.append((child, key))
                continue
            if text and block:
                head = (key, field_name)
            elif not text and head and set(field_name.split("_")) & set(head[1].split("_")):
                # train_split, val_split, test_split under one comment: it is written above the first
                text = f"See `{head[0]}`."
            else:
                head = None
            settings.append(Setting(key, kind, _default(value, source), text))
        for child, key in nested:
            walk(child, key)

    walk(ROOT_CLASS, "")
    return sections, settings


def _escape(text: str) -> str:
    """Markdown-safe table cell text; `code spans` are kept as they are (Python-Markdown's
    tables do not split a row at a `|` inside a code span)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i, part in enumerate(parts):
        if not part.startswith("`"):
            for char, escaped in (
                ("&", "&amp;"),
                ("<", "&lt;"),
                (">", "&gt;"),
                ("|", "\\|"),
                ("*", "\\*"),
                ("_", "\\_"),
            ):
                part = part.replace(char, escaped)
            parts[i] = part
    return "".join(parts)


def config_table(path: Path = CONFIG_PY) -> str:
    """Markdown: one heading and table per section of the config tree."""
    sections, settings = read_settings(path)
    lines = []
    for prefix, doc in sections:
        rows = [s for s in settings if (s.key.rpartition(".")[0] == prefix)]
        if not rows:
            continue
        lines += [f"### `{prefix}`" if prefix else "### Top level", ""]
        if doc:
            lines += [_escape(" ".join(doc.split())), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for s in rows:
            default = f"`{s.default}`" if s.default else ""
            lines.append(f"| `{s.key}` | `{s.kind}` | {default} | {_escape(s.description)} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} has lost its marker {MARKER}: the config table has nowhere to go")
    return markdown.replace(MARKER, config_table())
