"""Sources of a meta model's tensors for ``apply(..., weights=...)`` (:class:`~minipissa.plan.sourced.Source`):

- a safetensors checkpoint, one file or sharded as Hugging Face writes it (``model.safetensors.index.json``:
  ``{"weight_map": {key: file}}``), read tensor by tensor through ``safe_open`` (memory-mapped: never a whole file in
  memory, never a pickle); its headers give every shape and dtype before any tensor is read;
- any ``Mapping`` from state-dict key to tensor, whose values are asked for one at a time (a mapping that makes each
  tensor on demand is never asked for all of them at once; only its keys are listed up front).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..core.dtypes import SAFETENSORS
from ..core.errors import StateError
from ..plan.sourced import Source

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {code: dtype for dtype, code in SAFETENSORS.items()}


def open_source(weights: object) -> Source:
    """apply()'s ``weights``: a Mapping, or the path of a ``.safetensors`` file, of an index, or of a directory
    holding one of them; a named error for anything else (nothing is changed yet)."""
    if isinstance(weights, Mapping):
        return MappingSource(weights)
    if not isinstance(weights, (str, os.PathLike)) or not isinstance(os.fspath(weights), str):
        raise TypeError(
            "minipissa.apply: weights must be a path (a .safetensors file, a model.safetensors.index.json, or their "
            f"directory) or a Mapping from state-dict key to tensor, got {type(weights).__name__}"
        )
    path = Path(weights)
    if path.is_dir():
        found = [path / name for name in (INDEX, SINGLE) if (path / name).is_file()]
        if not found:
            raise StateError(f"minipissa.apply: weights='{path}' is a directory without {INDEX} or {SINGLE}")
        path = found[0]
    if not path.is_file():
        raise StateError(f"minipissa.apply: weights='{path}' is not a file or directory")
    what = f"checkpoint '{path}'"
    if path.name.endswith(".json"):
        return SafetensorsSource(_index(path), what)
    return SafetensorsSource(dict.fromkeys(_keys(path), path), what)


def _index(path: Path) -> dict[str, Path]:
    """{key: shard file} of a Hugging Face index, each shard checked to exist inside the index's directory and to
    hold the keys the index puts in it (their headers only are read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StateError(f"minipissa.apply: weights='{path}' is not a readable JSON index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise StateError(f"minipissa.apply: weights='{path}' has no \"weight_map\" of {{key: shard file name}}")
    shards: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise StateError(f"minipissa.apply: the index '{path}' names shard '{name}', outside its directory")
        shard = path.parent / name
        if not shard.is_file():
            raise StateError(f"minipissa.apply: the index '{path}' names shard '{name}', which is not in {path.parent}")
        have = set(_keys(shard))
        lacking = [k for k, v in weight_map.items() if v == name and k not in have]
        if lacking:
            raise StateError(f"minipissa.apply: the index '{path}' puts {lacking[:3]} in '{name}', which lacks them")
        shards[name] = shard
    return {key: shards[name] for key, name in weight_map.items()}


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"minipissa.apply: '{path}' is not a readable safetensors file ({e})") from None


class SafetensorsSource:
    """Tensors of safetensors files by key (``files``: key -> file), each file opened once, when first read."""

    def __init__(self, files: dict[str, Path], what: str) -> None:
        self.what = what
        self._files = files
        self._open: dict[Path, Any] = {}
        self._lock = threading.Lock()  # reads run in the fetch's worker thread, checks in the caller's

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def _file(self, key: str) -> Any:
        path = self._files[key]
        with self._lock:
            if path not in self._open:
                self._open[path] = safe_open(str(path), framework="pt")
            return self._open[path]

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        header = self._file(key).get_slice(key)
        return tuple(header.get_shape()), _DTYPES.get(header.get_dtype())

    def read(self, key: str) -> Tensor:
        return self._file(key).get_tensor(key)


class MappingSource:
    """Tensors of a Mapping: its keys listed once (no value made), each value asked for when read."""

    def __init__(self, mapping: Mapping[str, Any], what: str = "the weights mapping") -> None:
        self.what = what
        self._mapping = mapping
        self._keys = set(iter(mapping))  # a Mapping's own __contains__ may make the value (collections.abc's does)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None] | None:
        if type(self._mapping) is dict:  # a plain dict holds its values already: checked before any is read
            value = self._mapping[key]
            return (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else None
        return None

    def read(self, key: str) -> Tensor:
        return self._mapping[key]
