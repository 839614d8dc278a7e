"""minipissa's safetensors files: checksummed, versioned metadata (written atomically, see :mod:`.atomic`).

A file holds tensors plus one metadata entry, ``"minipissa"``: a JSON blob (format version, kind of
file, what the tensors mean, the sha256 of every tensor's name, dtype, shape and bytes, and
``blob_sha256``, the sha256 of the blob's own canonical JSON without that field). One entry, so the
file's bytes do not depend on the order in which safetensors writes metadata keys. Any truncation
or flipped byte surfaces as a :class:`StateError` when the file is read, never as wrong weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from safetensors import safe_open
from torch import Tensor

from ..core.dtypes import SAFETENSORS
from ..core.errors import PathLike, StateError, as_path
from ..core.fingerprint import raw_bytes
from .atomic import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "PathLike",
    "StateError",
    "as_path",
    "read",
    "tensors_digest",
    "write",
    "write_safetensors",
]

#: Version 2: weights fingerprinted by an exact hash of every element (version 1: sampled elements). Version 3:
#: QPiSSA records (a 4-bit residual); readers of versions 1-2 refuse it, so none loads it as a dense adapter.
#: Version 4: this round's additions: the values before training of modules trained in full (``trained0:``),
#: tensor hyperparameters of the optimizer (a capturable optimizer's lr), which readers of versions 1-3 cannot place,
#: the base's biases fingerprinted, and biases trained since apply saved (records.py).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
BLOB_KEY = "minipissa"
BLOB_SHA_FIELD = "blob_sha256"


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(raw_bytes(t))
    return digest.hexdigest()


def write_safetensors(tensors: Mapping[str, Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write plain CPU tensors in the safetensors format: an 8-byte little-endian header size, a JSON
    header (dtype, shape, byte range of each tensor; ``__metadata__``), then the raw bytes.

    Our own writer because ``safetensors.torch.save_file`` needs numpy, which is no dependency of
    minipissa (reading through ``safe_open`` does not). Tensors are written in name order.
    """
    if sys.byteorder != "little":  # the format is little-endian; raw bytes of a big-endian host are not
        raise StateError("minipissa: writing safetensors files needs a little-endian machine")
    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS:
            raise StateError(f"minipissa: tensor '{name}' has dtype {t.dtype}, which minipissa does not write")
        size = t.numel() * t.element_size()
        dtype, shape = SAFETENSORS[t.dtype], list(t.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def write(path: PathLike, tensors: Mapping[str, Tensor], kind: str, payload: dict[str, Any]) -> None:
    """Write ``tensors`` (plain CPU tensors) with a checksummed JSON blob ``{kind, payload...}`` atomically."""
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    content = {"format_version": FORMAT_VERSION, "kind": kind, "tensors_sha256": tensors_digest(plain), **payload}
    content[BLOB_SHA_FIELD] = _blob_sha(content)
    metadata = {BLOB_KEY: json.dumps(content, sort_keys=True)}
    atomic_write(path, lambda temp: write_safetensors(plain, temp, metadata))


def _blob_sha(content: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in content.items() if k != BLOB_SHA_FIELD}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def read(path: PathLike, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The verified JSON blob and all tensors (on the CPU) of a minipissa file, read through one open handle
    (so that a file renamed over this one meanwhile cannot mix two versions).

    Raises:
        StateError: missing or unreadable file, not safetensors, not written by minipissa, a different
            ``kind``, corrupted metadata or tensors, or an unknown format version.
    """
    where = f"minipissa: '{as_path(path)}'"
    if not as_path(path).is_file():
        raise StateError(f"{where} does not exist or is not a file")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - held open while safetensors reads through it
    except OSError as e:  # the OS's reason (permissions...) rather than the parser's guess
        raise StateError(f"{where} cannot be opened: {e.strerror or e}") from None
    with handle:
        try:
            # safetensors opens the file by name again for the tensors' storage: give it this very file (a
            # rename over `path` meanwhile must not mix two versions), where the OS names open files.
            with safe_open(_open_name(handle, path), framework="pt") as f:
                metadata = f.metadata() or {}
                info = _blob(metadata, where, kind)
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no mapping
        except StateError:
            raise
        except Exception as e:  # the parser's own errors (truncation, bad header, ...) all mean one thing here
            raise StateError(f"{where} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    if tensors_digest(tensors) != info.get("tensors_sha256"):
        raise StateError(f"{where}: the tensor checksum does not match: the file is corrupted")
    return info, tensors


def _open_name(handle: Any, path: PathLike) -> str:
    """A name for the file ``handle`` holds open, which stays that file whatever is renamed over ``path``:
    /proc/self/fd/N (Linux) or /dev/fd/N (macOS), if this system has them; else ``path`` itself."""
    for name in (f"/proc/self/fd/{handle.fileno()}", f"/dev/fd/{handle.fileno()}"):
        with contextlib.suppress(OSError):
            mine, named = os.fstat(handle.fileno()), os.stat(name)
            if (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
                return name
    return str(path)


def _blob(metadata: dict[str, str], where: str, kind: str | None) -> dict[str, Any]:
    if BLOB_KEY not in metadata:
        raise StateError(
            f"{where} is a safetensors file without minipissa metadata (a PEFT adapter or a plain checkpoint?); "
            "minipissa reads files written by minipissa.save() / save_residual()"
        )
    try:  # nesting thousands deep, or an integer of 100,000 digits: corrupted or crafted, never ours
        info = json.loads(metadata[BLOB_KEY])
        intact = isinstance(info, dict) and info.get(BLOB_SHA_FIELD) == _blob_sha(info)
    except (ValueError, RecursionError) as e:
        raise StateError(
            f"{where}: the metadata cannot be parsed ({type(e).__name__}): the file is corrupted"
        ) from None
    if not intact:
        raise StateError(f"{where}: the metadata checksum does not match: the file is corrupted; save it again")
    version = info.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StateError(
            f"{where} has format version {version!r}; this minipissa reads versions {list(READABLE_VERSIONS)}. "
            "Use the minipissa version that wrote it, or upgrade minipissa."
        )
    if kind is not None and info.get("kind") != kind:
        raise StateError(
            f"{where} is a minipissa file of kind '{info.get('kind')}', expected kind '{kind}' "
            "(adapters: minipissa.load(); residual weights: minipissa.load_residual())"
        )
    return info
