"""Every file or folder the documents, configs and code comments name exists in the repository.

A reader of the repository has only the repository: a README link to a page that is not there, a config
comment citing a design note that was never committed, or a data path on the machine where a number was
measured, sends them nowhere. Scanned: README.md, the Markdown under benchmarks/ (RESULTS.md, the log, the
kept results' notes) and docs/, the YAML configs and cluster.yaml, the benchmark shell scripts, and the
comments and docstrings of every .py file. Checked there:
  - repository-relative paths (configs/..., benchmarks/..., ioisray/..., tests/..., docs/...) of a file
    (by its extension) or of a folder (ending in "/") exist;
  - Markdown links to local files exist, relative to the document;
  - a log file named by its date (2026-12-04.md) exists in benchmarks/log/;
  - nothing cites the design note or the shared data folder of the machines the project was built on
    (the reader has neither).
Placeholders the reader fills in (/path/to/..., <runs>/...) are not paths of the repository.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TOP = r"(?:configs|benchmarks|ioisray|tests|docs)"
_EXT = r"(?:yaml|yml|py|md|sh|json|csv|png|toml|txt)"
# Not inside a longer path (an absolute one, /path/to/..., <runs>/...): nothing path-like right before it.
_FILE = re.compile(rf"(?<![\w./<>$~-])(?:\./)?({_TOP}/[\w./-]*\w\.{_EXT})(?![\w/-])")
# A folder ends in "/" and is not the start of a pattern (configs/data/*.yaml, results/<run>/...).
_FOLDER = re.compile(rf"(?<![\w./<>$~-])(?:\./)?({_TOP}/(?:[\w.-]+/)*)(?![\w*?<{{$\[-])")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_LOG_DATE = re.compile(r"(?<![\w/-])(?:log/)?(\d{4}-\d{2}-\d{2}\.md)\b")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# Built from parts so that this file does not name them itself.
_FORBIDDEN = [
    (re.compile(r"\bIOIS" + r"\.md\b"), "a design note that is not in the repository"),
    (re.compile(r"\bshared" + r"/"), "a data folder that is not in the repository"),
]


def _documents(root: Path) -> list[Path]:
    found = [root / "README.md", root / "cluster.yaml", root / "mkdocs.yml"]
    found += sorted((root / "benchmarks").rglob("*.md"))
    found += sorted((root / "docs").glob("*.md"))
    found += sorted((root / "configs").rglob("*.yaml"))
    found += sorted((root / "benchmarks").glob("*.sh"))
    return [p for p in found if p.is_file()]


def _python_files(root: Path) -> list[Path]:
    return sorted(p for top in ("ioisray", "benchmarks", "tests") for p in (root / top).rglob("*.py"))


def _comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    parts = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    stack: list[ast.AST] = [ast.parse(source)]
    while stack:  # statements only: a docstring is never inside an expression
        node = stack.pop()
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            parts.append((body[0].lineno, body[0].value.value))
        stack.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))
    return parts


def _check_text(root: Path, doc: Path, start_line: int, text: str, markdown: bool, out: list[str]) -> None:
    name = doc.relative_to(root).as_posix()

    def problem(offset: int, what: str) -> None:
        out.append(f"{name}:{start_line + text.count(chr(10), 0, offset)}: {what}")

    links = list(_LINK.finditer(text)) if markdown else []
    in_link = lambda m: any(link.start() <= m.start(1) < link.end() for link in links)  # noqa: E731
    for m in _FILE.finditer(text):
        if not in_link(m) and not (root / m.group(1)).is_file():
            problem(m.start(), f"{m.group(1)} does not exist")
    for m in _FOLDER.finditer(text):
        if not in_link(m) and not (root / m.group(1)).is_dir():
            problem(m.start(), f"{m.group(1)} is not a folder")
    for pattern, what in _FORBIDDEN:
        for m in pattern.finditer(text):
            problem(m.start(), f"{m.group(0)} names {what}")
    for m in links:
        target = m.group(1).split("#", 1)[0]
        if target and not _SCHEME.match(target) and not target.startswith("/path/to/") \
                and not (doc.parent / target).exists():
            problem(m.start(), f"link to {m.group(1)} leads nowhere")
    if markdown and doc.parent.name in ("benchmarks", "log"):
        for m in _LOG_DATE.finditer(text):
            if not (root / "benchmarks" / "log" / m.group(1)).is_file():
                problem(m.start(), f"benchmarks/log/{m.group(1)} does not exist")


def dangling_references(root: Path) -> list[str]:
    """'file:line: what' for every reference under `root` that leads nowhere."""
    out: list[str] = []
    for doc in _documents(root):
        _check_text(root, doc, 1, doc.read_text(encoding="utf-8"), doc.suffix == ".md", out)
    this_file = Path(__file__).resolve()
    for py in _python_files(root):
        if py.resolve() == this_file:
            continue
        source = py.read_text(encoding="utf-8")
        if not any(p.search(source) for p in (_FILE, _FOLDER, *(f for f, _ in _FORBIDDEN))):
            continue  # nothing to check: spare tokenizing it
        for line, text in _comments_and_docstrings(source):
            _check_text(root, py, line, text, False, out)
    return out


def test_every_path_and_link_in_the_repository_exists():
    problems = dangling_references(ROOT)
    assert not problems, "references that lead nowhere:\n" + "\n".join(problems)


def test_the_check_finds_what_leads_nowhere_and_accepts_placeholders(tmp_path):
    note, folder = "IOIS" + ".md", "sha" + "red/"  # built from parts, as _FORBIDDEN is
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "real.yaml").write_text(
        "# see configs/real.yaml and configs/gone.yaml; data.root=/path/to/ham10000\n"
        f"# the note in {note}, data in ../{folder}data/x\n")
    (tmp_path / "benchmarks" / "log").mkdir(parents=True)
    (tmp_path / "benchmarks" / "log" / "2026-01-01.md").write_text(
        "As `2026-01-01.md` and `2026-01-02.md` say; kept in `benchmarks/results/` and `configs/`;\n"
        "runs in <runs>/configs/x.yaml, globs configs/*.yaml and benchmarks/results/run_*_s?/metrics.json.\n")
    (tmp_path / "README.md").write_text(
        "[ok](configs/real.yaml) [gone](docs/page.md) [web](https://example.org/a.md) [anchor](#top)\n"
        "![figure](benchmarks/log/2026-01-01.md#x) [data](/path/to/my_images/)\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        '"""Uses configs/real.yaml and tests/missing.py."""\n'
        'PATH = "configs/not_a_comment.yaml"  # but configs/nor_this.yaml\n')
    assert dangling_references(tmp_path) == [
        "README.md:1: link to docs/page.md leads nowhere",
        "benchmarks/log/2026-01-01.md:1: benchmarks/results/ is not a folder",
        "benchmarks/log/2026-01-01.md:1: benchmarks/log/2026-01-02.md does not exist",
        "configs/real.yaml:1: configs/gone.yaml does not exist",
        f"configs/real.yaml:2: {note} names a design note that is not in the repository",
        f"configs/real.yaml:2: {folder} names a data folder that is not in the repository",
        "tests/test_x.py:2: configs/nor_this.yaml does not exist",
        "tests/test_x.py:1: tests/missing.py does not exist",
    ]
