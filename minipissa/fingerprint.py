"""Cheap fingerprints of weight tensors, to tell the right base model from a wrong one.

A fingerprint is a few float64 moments (robust to the summation order of another device) plus a
hash of evenly spaced elements' raw bytes (exact: one changed bit in the sample changes it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

SAMPLES = 4096
MOMENT_RTOL = 1e-6


@torch.no_grad()
def fingerprint(weight: Tensor) -> dict[str, Any]:
    """{"shape", "dtype", "sum", "sumsq", "sample_sha256"} of a tensor, JSON-able."""
    return fingerprint_later(weight)()


@torch.no_grad()
def fingerprint_later(weight: Tensor) -> Callable[[], dict[str, Any]]:
    """Queue a fingerprint's device work now; the returned function reads it back when called.

    apply() fingerprints every weight twice: reading each result back at once would stop the host
    until the GPU is idle, 448 times for a 7B model. Called after the loop, the reads are copies.
    """
    flat = weight.detach().reshape(-1)
    # Integer arithmetic: a float32 linspace rounds n - 1 up past the end for n > 2^24 elements.
    count = min(SAMPLES, flat.numel())
    index = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
    sample = flat[index].contiguous()
    # Moments by row, each reduction reading the weight once: no float64 copy of it (4x the
    # weight's bytes, twice per module at init). Row sums in float32 (rows of <= ~10^4 elements:
    # rounding ~1e-7 of the row's magnitude, far inside MOMENT_RTOL), row norms in float64
    # (float32 norms of bf16 rows drift by ~1e-6).
    rows = flat.reshape(-1, weight.shape[-1]) if weight.ndim else flat.reshape(1, 1)
    if not rows.is_floating_point():  # integer tensors (quantized storage): norms need floats
        rows = rows.to(torch.float64)
    sums = rows.sum(dim=1, dtype=torch.float32).to(torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
    moments = torch.stack([sums.sum(), norms.square().sum()])
    shape, dtype = list(weight.shape), str(weight.dtype).removeprefix("torch.")

    def read() -> dict[str, Any]:
        total, sumsq = moments.tolist()
        raw = sample.cpu().view(torch.uint8)
        return {
            "shape": shape,
            "dtype": dtype,
            "sum": total,
            "sumsq": sumsq,
            "sample_sha256": hashlib.sha256(bytes(raw.tolist())).hexdigest(),
        }

    return read


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


def describe(sigma: Tensor, base: dict[str, Any], residual: dict[str, Any]) -> dict[str, Any]:
    """A layer's info entries about its weight: kept singular values, ||W||_F and both fingerprints."""
    return {
        "singular_values": sigma.tolist(),
        "weight_norm": math.sqrt(base["sumsq"]),
        "base_fingerprint": base,
        "residual_fingerprint": residual,
    }
