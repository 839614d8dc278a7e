"""Reading a 4-bit NF4 weight stored by another library (bitsandbytes' ``Params4bit`` and its ``QuantState``) back to
its dense values, bit for bit as bitsandbytes 0.50.2's ``dequantize_4bit`` gives them (its CUDA kernel and its
reference; its CPU C kernel cuts the blocks per row on AVX-512 CPUs, which is wrong for rows that are not a
multiple of the block).

    dense = dequantize(Packed4bit(data, absmax, blocksize, shape, dtype, nested))

The 4-bit part is :func:`minipissa.core.nf4.dequantize` (the one dequantizer): blocks of ``blocksize`` consecutive
elements of the flattened weight, each with its float32 absmax, packed two indices a byte, the first in the high
nibble. A blocksize that is a multiple of 64 is read as blocks of 64 that share their absmax (each element is still
``code * absmax`` in float32, then cast once: the same values); blocksize 32 is not read.

Double quantization (bitsandbytes' ``compress_statistics=True``) stores the absmax as 8-bit codes q with a float32
absmax per ``nested.blocksize`` of them and a float32 ``offset``; the first-level absmax is

    absmax[i] = code8[q[i]] * absmax2[i // nested.blocksize] + offset        (float32, two roundings)

with ``code8`` the 256-entry map stored in the state (bitsandbytes' dynamic map: read, never re-derived).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import nf4

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Nested:
    """The statistics of double quantization: what turns 8-bit absmax codes into the float32 absmax."""

    absmax: Tensor  # float32 (ceil(blocks / blocksize),)
    code: Tensor  # float32 (256,): the 8-bit map
    blocksize: int
    offset: Tensor  # float32, one element: the mean subtracted before quantizing


@dataclass(frozen=True)
class Packed4bit:
    """One NF4 weight as stored: ``data`` the packed bytes, uint8 ((numel + 1) // 2,) (another storage dtype viewed
    as its bytes: :func:`packed_bytes`); ``absmax`` float32 (blocks,), or the uint8 (blocks,) codes of ``nested``;
    blocks = ceil(numel / blocksize); ``shape`` and ``dtype``: the weight it stands for."""

    data: Tensor
    absmax: Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested: Nested | None = None


def packed_bytes(data: Tensor) -> Tensor:
    """The bytes of a packed 4-bit tensor, uint8 (n,), whatever dtype it is stored in (bitsandbytes'
    ``quant_storage``: a bfloat16 storage reports a float dtype while it holds packed indices)."""
    flat = data.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def problem(p: Packed4bit) -> str | None:
    """What makes ``p`` unreadable here (a phrase naming what was found), or None. Checks metadata, dtypes and
    sizes only: nothing is read from the device."""
    b, shape = p.blocksize, p.shape
    if type(b) is not int or b <= 0 or b % nf4.BLOCK:
        return (
            f"blocksize {b!r} (minipissa reads blocks of {nf4.BLOCK} and their multiples; bitsandbytes' default is 64)"
        )
    if not shape or not all(type(s) is int and s > 0 for s in shape):
        return f"shape {shape!r}"
    if p.dtype not in FLOATS:
        return f"a weight dtype of {p.dtype} (float32, bfloat16 or float16 expected)"
    numel = math.prod(shape)
    blocks = -(-numel // b)
    if p.data.dtype != torch.uint8 or p.data.shape != ((numel + 1) // 2,):
        return f"{p.data.numel()} packed {p.data.dtype} values for {shape} ({(numel + 1) // 2} bytes expected)"
    if p.nested is None:
        return _sized(p.absmax, torch.float32, blocks, "absmax")
    n = p.nested
    if type(n.blocksize) is not int or n.blocksize <= 0:
        return f"a nested blocksize of {n.blocksize!r}"
    return (
        _sized(p.absmax, torch.uint8, blocks, "8-bit absmax codes")
        or _sized(n.absmax, torch.float32, -(-blocks // n.blocksize), "nested absmax")
        or _sized(n.code, torch.float32, 256, "nested code map")
        or _sized(n.offset, torch.float32, 1, "nested offset")
    )


def _sized(t: object, dtype: torch.dtype, numel: int, what: str) -> str | None:
    if isinstance(t, Tensor) and t.dtype == dtype and t.ndim <= 1 and t.numel() == numel:
        return None
    found = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
    return f"{what} of {found} ({numel} {dtype} values expected)"


def first_level_absmax(p: Packed4bit) -> Tensor:
    """The float32 absmax (blocks,) of ``p``, on its data's device: stored, or decoded from double quantization
    as bitsandbytes computes it (module docstring)."""
    device = p.data.device
    if p.nested is None:
        return p.absmax.to(device)
    n = p.nested
    blocks = p.absmax.numel()
    scale = n.absmax.to(device).repeat_interleave(n.blocksize)[:blocks]
    values = n.code.to(device)[p.absmax.to(device).int()]  # a new tensor: multiplied and shifted in place
    return values.mul_(scale).add_(n.offset.to(device).reshape(()))


def dequantize(p: Packed4bit) -> Tensor:
    """The weight of ``p.shape`` in ``p.dtype`` on the data's device, equal to bitsandbytes' ``dequantize_4bit``.
    ``p`` must be readable (:func:`problem`)."""
    absmax = first_level_absmax(p)
    shared = p.blocksize // nf4.BLOCK
    if shared > 1:  # blocks of 64 sharing their block's absmax; the partial last block's too
        absmax = absmax.repeat_interleave(shared)[: -(-math.prod(p.shape) // nf4.BLOCK)]
    return nf4.dequantize(p.data, absmax, p.shape, p.dtype)
