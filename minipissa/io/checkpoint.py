"""Sources of a meta model's tensors for ``apply(..., weights=...)`` (:class:`~minipissa.plan.sourced.Source`):

- a safetensors checkpoint, one file or sharded as Hugging Face writes it (``model.safetensors.index.json``:
  ``{"weight_map": {key: file}}``), read tensor by tensor through ``safe_open`` (memory-mapped: never a whole file in
  memory, never a pickle); its headers give every shape and dtype before any tensor is read; each tensor is read
  from the file straight into its buffer (pinned for a CUDA fetch): one host copy, and reads in several threads at
  once (the fetch's readers) run in parallel, page cache cold or warm;
- any ``Mapping`` from state-dict key to tensor, whose values are asked for one at a time (a mapping that makes each
  tensor on demand is never asked for all of them at once; only its keys are listed up front).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
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
        self._layouts: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # reads run in the fetch's reader threads, checks in the caller's

    #: Reads may run in several threads at once (each opens its own file handle).
    parallel = True

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

    def read(self, key: str, pinned: bool = False) -> Tensor:
        """The tensor of ``key``, read into a fresh buffer (pinned host memory if ``pinned``) with one copy."""
        start, entry = self._entry(key)
        dtype = _DTYPES.get(entry.get("dtype", ""))
        shape = [int(n) for n in entry.get("shape", ())]
        begin, end = (int(n) for n in entry.get("data_offsets", (0, -1)))
        size = end - begin
        if dtype is None or sys.byteorder != "little" or size != _numel(shape) * dtype.itemsize:
            value = self._file(key).get_tensor(key)  # what this reader does not lay out itself: safetensors does
            return value.pin_memory() if pinned else value
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        _read_into(self._files[key], start + begin, buffer)
        return buffer.view(dtype).view(shape)

    def _entry(self, key: str) -> tuple[int, dict[str, Any]]:
        """(where the file's data begins, the header's entry of ``key``); the header was checked by safe_open."""
        path = self._files[key]
        with self._lock:
            if path not in self._layouts:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    self._layouts[path] = (8 + length, json.loads(f.read(length)))
            start, header = self._layouts[path]
        return start, header[key]


def _numel(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _read_into(path: Path, offset: int, buffer: Tensor) -> None:
    """``buffer.numel()`` bytes of ``path`` from ``offset`` into the (uint8, contiguous) ``buffer``. A file handle of
    its own, so that threads read at once; readinto drops the GIL."""
    size = buffer.numel()
    if size == 0:
        return
    view = memoryview((ctypes.c_char * size).from_address(buffer.data_ptr())).cast("B")
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < size:
            got = f.readinto(view[done : done + (1 << 30)])
            if not got:
                raise StateError(f"minipissa.apply: '{path}' ends before its tensors do (truncated?)")
            done += got


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

    #: One read at a time, in the stream's order: a mapping that makes its values may not be thread-safe, nor give
    #: the same values in another order.
    parallel = False

    def read(self, key: str, pinned: bool = False) -> Tensor:
        value = self._mapping[key]
        if pinned and isinstance(value, Tensor) and value.device.type == "cpu" and not value.is_pinned():
            return value.pin_memory()  # the one host copy (a pinned value, e.g. a pool's, is used as it is)
        return value
