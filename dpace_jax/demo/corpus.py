"""The demo corpus: the Python standard library of the running interpreter, and function tasks.

Every machine that runs this package has the standard library's source, so it is the text the
embedded demo target is trained on. Collection is deterministic for a given interpreter: files are
walked in sorted order, filtered by fixed rules (no tests, no site-packages, no generated codec
tables, size caps) and, when a file budget is set, subsampled by a seeded shuffle.

A "function task" is a function of that corpus with a docstring: its `def` line(s) plus docstring
form the prompt, the rest of its body is the reference answer. Tasks are split into train and
held-out sets by a seeded hash of their name, so a task's side of the split does not depend on
which other tasks were found.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

from dpace_jax.data.prompt_sets import PROMPT_HEADER, make_prompt  # noqa: F401

# Directory names never descended into.
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "encodings",  # generated codec tables
    "pydoc_data",  # one huge generated string
})
SKIP_PREFIXES = ("_sysconfigdata", "config-")



@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the corpus root, "/"-separated
    text: str


@dataclasses.dataclass(frozen=True)
class FunctionTask:
    name: str  # "<module path>::<qualified name>", unique within a corpus
    code: str  # the def line(s) and the docstring, dedented, ending in a newline
    body: str  # the statements after the docstring, dedented like `code`, ending in a newline

    @property
    def prompt(self) -> str:
        """The user message asking for the function's body."""
        return make_prompt(self.code)

    @property
    def answer(self) -> str:
        """The reference assistant message: the body in a python code fence."""
        body = self.body if self.body.endswith("\n") else self.body + "\n"
        return f"```python\n{body}```"


def collect_sources(
    root: str | Path | None = None,
    *,
    max_file_bytes: int = 200_000,
    max_files: int | None = None,
    max_total_bytes: int | None = None,
    seed: int = 0,
) -> list[SourceFile]:
    """Python files under `root` (default: the stdlib), sorted by relative path.

    Files larger than `max_file_bytes`, not UTF-8, or not parseable Python are skipped. With
    `max_files`, a seeded random subset of that many files is kept; with `max_total_bytes`, files
    are then dropped (in seeded order) until the total fits. The result is sorted either way.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {str(root)!r} is not a directory")
    paths = sorted(_walk(root))
    files = []
    for p in paths:
        try:
            if p.stat().st_size > max_file_bytes:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        files.append(SourceFile(p.relative_to(root).as_posix(), text))
    if max_files is not None or max_total_bytes is not None:
        order = list(range(len(files)))
        random.Random(seed).shuffle(order)
        if max_files is not None:
            order = order[:max_files]
        if max_total_bytes is not None:
            kept, total = [], 0
            for i in order:
                size = len(files[i].text.encode("utf-8"))
                if total + size <= max_total_bytes:
                    kept.append(i)
                    total += size
            order = kept
        files = [files[i] for i in sorted(order)]
    if not files:
        raise ValueError(f"no usable .py files found under {str(root)!r}")
    return files


def _walk(root: Path) -> Iterable[Path]:
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(SKIP_PREFIXES) or entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if entry.name not in SKIP_DIRS:
                yield from _walk(entry)
        elif entry.suffix == ".py" and entry.is_file():
            yield entry


def corpus_fingerprint(files: Sequence[SourceFile]) -> str:
    """A short hash of the corpus content (paths and texts)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.path.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(f.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def extract_tasks(
    files: Sequence[SourceFile],
    *,
    min_body_lines: int = 2,
    max_body_lines: int = 30,
    max_chars: int = 2000,
) -> list[FunctionTask]:
    """Functions with a docstring and a body of min..max lines (after the docstring), in corpus
    order. Files that do not parse are skipped."""
    tasks = []
    for f in files:
        try:
            tree = ast.parse(f.text)
        except (SyntaxError, ValueError):
            continue
        lines = f.text.splitlines()
        for qualname, node in _functions(tree, ""):
            task = _task(f.path, qualname, node, lines, min_body_lines, max_body_lines,
                         max_chars)
            if task is not None:
                tasks.append(task)
    return tasks


def _functions(node: ast.AST, prefix: str):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield qual, child
            yield from _functions(child, qual + ".")


def _task(path, qualname, node, lines, min_body, max_body, max_chars) -> FunctionTask | None:
    if len(node.body) < 2 or ast.get_docstring(node, clean=False) is None:
        return None
    doc = node.body[0]
    head = lines[node.lineno - 1 : doc.end_lineno]
    body = lines[doc.end_lineno : node.end_lineno]
    # The docstring must end its line and the body must start on a later one.
    if node.body[1].lineno <= doc.end_lineno:
        return None
    while body and not body[-1].strip():
        body.pop()
    n_code = sum(1 for ln in body if ln.strip())
    if not (min_body <= n_code <= max_body):
        return None
    indent = node.col_offset
    head, body = _dedent(head, indent), _dedent(body, indent)
    if head is None or body is None:
        return None
    code, body_text = "\n".join(head) + "\n", "\n".join(body) + "\n"
    if len(code) + len(body_text) > max_chars or "\t" in code + body_text:
        return None
    return FunctionTask(f"{path}::{qualname}", code, body_text)


def _dedent(lines: list[str], indent: int) -> list[str] | None:
    """Remove `indent` leading spaces from every non-blank line; None if a line has fewer
    (e.g. a docstring continuation at column 0 inside a method)."""
    out = []
    for ln in lines:
        if not ln.strip():
            out.append("")
        elif ln[:indent].strip() or len(ln) < indent:
            return None
        else:
            out.append(ln[indent:].rstrip())
    return out


def split_tasks(
    tasks: Sequence[FunctionTask], *, heldout_fraction: float = 0.05, seed: int = 0
) -> tuple[list[FunctionTask], list[FunctionTask]]:
    """Deterministic (train, held-out) split by a seeded hash of each task's name."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train, heldout = [], []
    for t in tasks:
        digest = hashlib.sha256(f"{seed}:{t.name}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (heldout if u < heldout_fraction else train).append(t)
    return train, heldout
