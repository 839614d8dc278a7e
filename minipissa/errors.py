"""The one error type of minipissa's files, and the check that a path is a path."""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike[str]


class StateError(ValueError):
    """A minipissa file or model cannot be saved, loaded or converted; the message says why and what to do.

    Raised before anything is changed: the model and the files are left as they were.
    """


def as_path(path: object, what: str = "path") -> Path:
    """``path`` (str or os.PathLike of str) as a Path; a named error for anything else (bytes, None, ...)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str) or not os.fspath(path):
        raise StateError(f"minipissa: the {what} must be a non-empty str or pathlib.Path, got {path!r:.80}")
    return Path(path)
