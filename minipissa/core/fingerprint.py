"""Fingerprints of weight tensors, to tell the right base model from a wrong one, exactly.

A fingerprint is an exact 64-bit hash of every element's bit pattern *and position*, plus two float64
moments (the sum and the sum of squares: ‖W‖_F for the summary). Seen as a matrix (rows, last dim), the
hash is ``sum_ij bits_ij * r_i * c_j`` with pseudo-random odd 64-bit keys r (per row) and c (per column),
in int64 arithmetic, which wraps around. Any change of one element changes it (an odd key times a nonzero
change is nonzero modulo 2^64); a swap or a permutation of elements changes it unless 64-bit products
collide (a chance of about 2^-31). Addition modulo 2^64 does not depend on the order of the sum, so the
CPU and any GPU give the same hash for the same tensor, computed where the tensor lives, in three passes.

Version-1 files hold an older fingerprint (moments and a hash of 4,096 sampled elements); they are
compared in their own terms (:func:`same`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .dtypes import dtype_name


def raw_bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t`` (row-major, on the CPU), without numpy, which is no dependency of minipissa."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()) if flat.numel() else b""


#: Elements hashed per step: bounds the int64 temporaries (8 bytes each) whatever the weight's size. Fewer, larger
#: steps launch fewer kernels (benchmarks/README.md, "Figures behind the code").
CHUNK = 1 << 25
_K = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constants as signed int64 (splitmix64's)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
LEGACY_SAMPLES, LEGACY_RTOL = 4096, 1e-6


@dataclass
class Pending:
    """A fingerprint whose device work is queued: :func:`read_all` reads it back."""

    shape: list[int]
    dtype: str
    values: Tensor  # (3,) int64: the hash, and the bits of the float64 sum and sum of squares


@functools.lru_cache(maxsize=64)
def _keys(n: int, salt: int, device: torch.device) -> Tensor:
    """n pseudo-random odd int64 keys, a function of (n, salt) alone (splitmix64's mixer, arithmetic shifts)."""
    offset = (salt * _K) % (1 << 64)
    z = torch.arange(n, dtype=torch.int64, device=device) + (offset - (1 << 64) if offset >> 63 else offset)
    z ^= z >> 30
    z *= _M1
    z ^= z >> 27
    z *= _M2
    z ^= z >> 31
    return z | 1


def _matrix(t: Tensor) -> Tensor:
    """``t`` seen as the matrix its hash covers: (rows, last dim); a scalar or an empty tensor as one row."""
    flat = t.detach().reshape(-1)
    return flat.reshape(-1, t.shape[-1] if t.ndim and flat.numel() else max(flat.numel(), 1))


def rows_per_step(n: int, width: int) -> int:
    """Rows of each of n matrices hashed per step: at most CHUNK elements of int64 temporaries (one row each, at
    least)."""
    return max(1, CHUNK // (width * n))


def _digests(matrices: Tensor) -> Tensor | None:
    """(n,) int64: the hash of each of n matrices (n, rows, width) of one dtype; None for matrices without rows."""
    n, height, width = matrices.shape
    bits = matrices.view(_INT_VIEW[matrices.element_size()]) if matrices.is_floating_point() else matrices
    columns, rows = _keys(width, 1, matrices.device), _keys(height, 2, matrices.device)
    on_cpu = matrices.device.type == "cpu"
    digest: Tensor | None = None
    step = rows_per_step(n, width)
    for start in range(0, height, step):
        chunk, keys = bits[:, start : start + step], rows[start : start + step]
        # On a CPU, int64 GEMVs (faster there than the elementwise form; int64 wraps the same way in any order).
        # Elsewhere (CUDA has no integer GEMV) int16/int32 bits times int64 keys, promoted inside one kernel: no
        # int64 copy of W first.
        part = chunk.to(torch.int64) @ columns @ keys if on_cpu else ((chunk * columns).sum(dim=-1) * keys).sum(-1)
        digest = part if digest is None else digest + part
    return digest


@torch.no_grad()
def fingerprint_later(weight: Tensor) -> Pending:
    """Queue a fingerprint's device work (no host sync), to be read back later by :func:`read_all`."""
    matrix = _matrix(weight)
    digests = _digests(matrix.unsqueeze(0))
    digest = None if digests is None else digests[0]
    # Moments: row sums and row norms in float32 (float64 for float64 weights), accumulated in float64, so that each
    # reduction reads W once: a float64 norm of a bfloat16 W would first copy all of it to float64. Rows whose
    # norm exceeds float32's range (entries above ~1e19) read as infinite, as non-finite ones.
    floats = matrix if matrix.is_floating_point() else matrix.to(torch.float64)
    rows_dtype = torch.float64 if floats.dtype == torch.float64 else torch.float32
    total = floats.sum(dim=1, dtype=rows_dtype).sum(dtype=torch.float64)
    sumsq = torch.linalg.vector_norm(floats, dim=1, dtype=rows_dtype).to(torch.float64).square().sum()
    if digest is None:  # no rows
        digest = torch.zeros((), dtype=torch.int64, device=matrix.device)
    values = torch.stack([digest, total.view(torch.int64), sumsq.view(torch.int64)])
    return Pending(list(weight.shape), dtype_name(weight.dtype), values)


def read_all(queued: Sequence[Pending | dict[str, Any]]) -> list[dict[str, Any]]:
    """The fingerprints of ``queued`` (those read already pass through), with one device-to-host copy per device."""
    pending = [p for p in queued if isinstance(p, Pending)]
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(pending):
        by_device.setdefault(p.values.device, []).append(i)
    values: list[list[int]] = [[] for _ in pending]
    for items in by_device.values():
        rows = torch.stack([pending[i].values for i in items]).cpu()
        for i, row in zip(items, rows, strict=True):
            values[i] = row.tolist()
    read = iter(
        {
            "shape": p.shape,
            "dtype": p.dtype,
            "sum": torch.tensor(total).view(torch.float64).item(),
            "sumsq": torch.tensor(sumsq).view(torch.float64).item(),
            "hash": f"{digest & (2**64 - 1):016x}",
        }
        for p, (digest, total, sumsq) in zip(pending, values, strict=True)
    )
    return [next(read) if isinstance(p, Pending) else p for p in queued]


@torch.no_grad()
def hashes(tensors: Sequence[Tensor]) -> list[str]:
    """The hash of each tensor (its fingerprint's ``"hash"``), those of one shape, dtype and device hashed
    together: a few launches for a group, where a fingerprint costs about ten for each tensor (and a large model has
    hundreds of small initial factors), and one read-back per device."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    digests: dict[torch.device, list[tuple[list[int], Tensor]]] = {}
    for (_, _, device), members in groups.items():
        stacked = torch.stack([_matrix(tensors[i]) for i in members])
        digest = _digests(stacked)
        digest = torch.zeros(len(members), dtype=torch.int64, device=device) if digest is None else digest
        digests.setdefault(device, []).append((members, digest))
    out = [""] * len(tensors)
    for parts in digests.values():
        read = torch.cat([d for _, d in parts]).cpu().tolist()
        for i, value in zip([i for members, _ in parts for i in members], read, strict=True):
            out[i] = f"{value & (2**64 - 1):016x}"
    return out


def fingerprint(weight: Tensor) -> dict[str, Any]:
    """{"shape", "dtype", "sum", "sumsq", "hash"} of a tensor, JSON-able."""
    return read_all([fingerprint_later(weight)])[0]


def is_finite(print_: dict[str, Any]) -> bool:
    """Whether the fingerprinted tensor holds no NaN or infinity (its moments are then finite)."""
    return math.isfinite(print_["sum"]) and math.isfinite(print_["sumsq"])


def same(saved: dict[str, Any], weight: Tensor) -> bool:
    """Whether ``weight`` is the tensor a saved fingerprint describes (exactly; a version-1 fingerprint:
    moments to LEGACY_RTOL and its sampled elements exactly)."""
    if saved.get("shape") != list(weight.shape) or saved.get("dtype") != dtype_name(weight.dtype):
        return False
    if "hash" in saved:
        return bool(saved["hash"] == fingerprint(weight)["hash"])
    now = fingerprint(weight)
    sumsq = torch.linalg.vector_norm(weight.detach(), dtype=torch.float64).square().item()  # as version 1 took it
    scale = math.sqrt(max(saved["sumsq"], sumsq, 1e-300) * max(weight.numel(), 1))
    return (
        saved["sample_sha256"] == _legacy_sample_sha256(weight)
        and abs(saved["sum"] - now["sum"]) <= LEGACY_RTOL * scale
        and math.isclose(saved["sumsq"], sumsq, rel_tol=LEGACY_RTOL)
    )


@functools.lru_cache(maxsize=64)
def _legacy_index(numel: int, device: torch.device) -> Tensor:
    count = min(LEGACY_SAMPLES, numel)
    return torch.arange(count, device=device) * max(numel - 1, 0) // max(count - 1, 1)


def _legacy_sample_sha256(weight: Tensor) -> str:
    """Version 1's hash: sha256 of the raw bytes of 4,096 evenly spaced elements."""
    flat = weight.detach().reshape(-1)
    raw = flat[_legacy_index(flat.numel(), flat.device)].view(torch.uint8).cpu()
    return hashlib.sha256(ctypes.string_at(raw.data_ptr(), raw.numel()) if raw.numel() else b"").hexdigest()


def describe(sigma: Tensor, base: dict[str, Any]) -> dict[str, Any]:
    """A layer's info entries about its weight: kept singular values, ||W||_F and W's fingerprint."""
    return {"singular_values": sigma.tolist(), "weight_norm": math.sqrt(base["sumsq"]), "base_fingerprint": base}
