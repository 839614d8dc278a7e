"""Two real text corpora that every Python install has offline: the standard library's code and its docstrings.

Pretraining reads the stdlib ``.py`` sources with their docstrings blanked out (code and comments); fine-tuning
reads the docstrings alone (English prose about code). The two share a vocabulary of identifiers but differ in
distribution, which is what a fine-tuning demo needs. Files are split into train / held-out by a hash of their
path, so the held-out loss measures text the model never saw, and the split is the same on every machine that
ships the same stdlib.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field

# Test suites are huge and repetitive; site-packages is not the stdlib; the rest is not Python source.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib-dynload", "__pycache__", "ensurepip", "turtledemo"}


@dataclass
class Split:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)

    def chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.heldout))


def stdlib_files(limit_bytes: int) -> list[str]:
    """Sorted stdlib .py paths (deterministic order), up to ``limit_bytes`` of source in total."""
    root = sysconfig.get_paths()["stdlib"]
    paths: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.startswith("config-"))
        paths.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(".py"))
    paths.sort()
    chosen, total = [], 0
    # Spread the byte budget over the whole library (every k-th file) instead of taking the alphabetical head.
    sizes = {p: os.path.getsize(p) for p in paths}
    stride = max(1, int(sum(sizes.values()) / max(limit_bytes, 1)))
    for path in paths[::stride]:
        if total >= limit_bytes:
            break
        chosen.append(path)
        total += sizes[path]
    if not chosen:
        raise RuntimeError(f"no Python sources found under {root}; the examples need the standard library")
    return chosen


def is_heldout(path: str, fraction: float = 0.1) -> bool:
    rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) < fraction * 0x100000000


def split_code_and_docstrings(source: str) -> tuple[str, list[str]]:
    """(source with every docstring's lines removed, the docstrings cleaned by ``ast.get_docstring``)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    docs: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        expr = node.body[0]
        drop.update(range(expr.lineno - 1, (expr.end_lineno or expr.lineno)))
        if len(doc) >= 40:  # one-liners like "Return x." teach little prose
            docs.append(doc)
    code = "".join(line for i, line in enumerate(lines) if i not in drop)
    return code, docs


def load(limit_bytes: int = 3_000_000) -> tuple[Split, Split]:
    """(code split, docstring split) from about ``limit_bytes`` of stdlib source."""
    code, docs = Split(), Split()
    for path in stdlib_files(limit_bytes):
        try:
            with open(path, encoding="utf-8") as f:
                text, doc_list = split_code_and_docstrings(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (lib2to3 fixtures, encodings)
        held = is_heldout(path)
        (code.heldout if held else code.train).append(text)
        (docs.heldout if held else docs.train).extend(doc_list)
    for split in (code, docs):
        if not split.heldout:  # a tiny budget (--smoke) may pick no held-out file: hold out the last tenth
            cut = max(1, len(split.train) // 10)
            split.train, split.heldout = split.train[:-cut], split.train[-cut:]
    return code, docs
