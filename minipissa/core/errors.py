"""The one error type of minipissa's files, and the checks that a path is a path and a model a model."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

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


def as_module(model: object, what: str) -> nn.Module:
    """``model`` itself if it is an ``nn.Module``; a named TypeError for anything else (None, a path, a dict...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"minipissa.{what}: the model must be a torch.nn.Module, got {type(model).__name__}")
    return model
