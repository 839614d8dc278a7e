"""Cheap fingerprints of weight tensors, to tell the right base model from a wrong one.

A fingerprint is a few float64 moments (robust to the summation order of another device) plus a
hash of evenly spaced elements' raw bytes (exact: one changed bit in the sample changes it).
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

SAMPLES = 4096
MOMENT_RTOL = 1e-6


@torch.no_grad()
def fingerprint(weight: Tensor) -> dict[str, Any]:
    """{"shape", "dtype", "sum", "sumsq", "sample_sha256"} of a tensor, JSON-able."""
    return read_all([fingerprint_later(weight)])[0]


@dataclass
class Pending:
    """A fingerprint whose device work is queued: :func:`read_all` reads it back."""

    shape: list[int]
    dtype: str
    total: Tensor  # () float64
    norm: Tensor  # () float64, ||w||_F
    sample: Tensor  # the sampled elements' raw bytes, uint8


@functools.lru_cache(maxsize=64)
def _sample_index(numel: int, device: torch.device) -> Tensor:
    # Integer arithmetic: a float32 linspace rounds n - 1 up past the end for n > 2^24 elements.
    count = min(SAMPLES, numel)
    return torch.arange(count, device=device) * max(numel - 1, 0) // max(count - 1, 1)


@torch.no_grad()
def fingerprint_later(weight: Tensor) -> Pending:
    """Queue a fingerprint's device work, to be read back later by :func:`read_all`.

    apply() fingerprints every base weight: reading each result back at once would stop the host
    until the GPU is idle, 224 times for a 7B model; read together after the loop, it is one copy.
    """
    flat = weight.detach().reshape(-1)
    sample = flat[_sample_index(flat.numel(), flat.device)].view(torch.uint8)
    # Each reduction reads the weight once, with no float64 copy of it (4x the weight's bytes).
    # Row sums in float32 (rows of <= ~10^4 elements: rounding ~1e-7 of the row's magnitude, far
    # inside MOMENT_RTOL); the norm accumulates in float64 (float32 norms of bf16 drift by ~1e-6).
    rows = flat.reshape(-1, weight.shape[-1]) if weight.ndim else flat.reshape(1, 1)
    if not rows.is_floating_point():  # integer tensors (quantized storage): reductions need floats
        rows = rows.to(torch.float64)
    total = rows.sum(dim=1, dtype=torch.float32).sum(dtype=torch.float64)
    norm = torch.linalg.vector_norm(rows, dtype=torch.float64)
    return Pending(list(weight.shape), str(weight.dtype).removeprefix("torch."), total, norm, sample)


def read_all(queued: Sequence[Pending | dict[str, Any]]) -> list[dict[str, Any]]:
    """The fingerprints of ``queued`` (those read already pass through), with one device-to-host copy per device."""
    pending = [p for p in queued if isinstance(p, Pending)]
    done = iter(_read(pending))
    return [next(done) if isinstance(p, Pending) else p for p in queued]


def _read(pending: list[Pending]) -> list[dict[str, Any]]:
    moments: list[list[float]] = [[] for _ in pending]
    samples: list[bytes] = [b"" for _ in pending]
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(pending):
        by_device.setdefault(p.total.device, []).append(i)
    for items in by_device.values():
        values = torch.stack([t for i in items for t in (pending[i].total, pending[i].norm)]).cpu().view(-1, 2).tolist()
        raw = torch.cat([pending[i].sample for i in items]).cpu()
        everything = ctypes.string_at(raw.data_ptr(), raw.numel()) if raw.numel() else b""
        offset = 0
        for i, value in zip(items, values, strict=True):
            size = pending[i].sample.numel()
            moments[i], samples[i] = value, everything[offset : offset + size]
            offset += size
    return [
        {
            "shape": p.shape,
            "dtype": p.dtype,
            "sum": total,
            "sumsq": norm * norm,
            "sample_sha256": hashlib.sha256(sample).hexdigest(),
        }
        for p, (total, norm), sample in zip(pending, moments, samples, strict=True)
    ]


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints describe the same tensor (moments to MOMENT_RTOL, hash exactly)."""
    scale = math.sqrt(max(a["sumsq"], b["sumsq"], 1e-300) * max(math.prod(a["shape"]), 1))
    return (
        a["shape"] == b["shape"]
        and a["dtype"] == b["dtype"]
        and a["sample_sha256"] == b["sample_sha256"]
        and abs(a["sum"] - b["sum"]) <= MOMENT_RTOL * scale
        and math.isclose(a["sumsq"], b["sumsq"], rel_tol=MOMENT_RTOL)
    )


def describe(sigma: Tensor, base: dict[str, Any], residual: dict[str, Any] | None = None) -> dict[str, Any]:
    """A layer's info entries about its weight: kept singular values, ||W||_F and the fingerprints
    (the residual's may come later: :func:`minipissa.save` adds it if missing)."""
    info = {"singular_values": sigma.tolist(), "weight_norm": math.sqrt(base["sumsq"]), "base_fingerprint": base}
    if residual is not None:
        info["residual_fingerprint"] = residual
    return info
