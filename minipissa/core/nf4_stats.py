"""Double quantization of NF4's statistics: each float32 absmax (one per 64 weights) stored in 8 bits.

    stats = encode(absmax)        # uint8 codes (blocks,), float32 scale and offset (ceil(blocks / 256),)
    absmax_hat = decode(*stats)   # float32 (blocks,)

QLoRA's scheme in its layout (groups of 256 consecutive absmax, a float32 scale per group: 8.125 bits per absmax
instead of 32, so 0.127 bits per weight of statistics instead of 0.5), with another code, chosen by measuring
(benchmarks/README.md): a linear unsigned code from the group's minimum,

    offset = min(group),  scale = (max(group) - min(group)) / 255,  code = round((absmax - offset) / scale)
    absmax_hat = code * scale + offset                        (a multiply, then an add: no fused multiply-add)

which adds less error to the dequantized weights than bitsandbytes' dynamic 8-bit map around the mean
(MiniLM: +0.077 % over single quantization vs +0.094 %; Gaussian: +0.09 % vs +0.27 %): the Frobenius error an
absmax adds is its absolute error times its block's code norm, which a uniform step over the group's range keeps
small everywhere. The decoded absmax is never below the group's minimum (so never negative), a group of equal values
decodes exactly, and |absmax_hat - absmax| <= scale / 2 plus a few float32 roundings (tests/core/test_nf4_stats.py).

Deterministic: min and max are exact whatever the reduction order, and the rest is elementwise IEEE float32
arithmetic (a subtraction, a division, round-half-even, a clamp): the same bytes on any thread count, CPU or GPU
(bitsandbytes' own offset, a float32 mean, depends on the thread count). The 4-bit codes are chosen from the exact
absmax before this runs, as bitsandbytes does: double quantization changes the statistics only, never the codes.
A group holding a NaN or inf absmax (a non-finite weight) decodes to NaN throughout; its codes are 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: Absmax values per group sharing one scale and offset (QLoRA's 256).
GROUP = 256
#: The largest 8-bit code.
LEVELS = 255


class DoubleQuantized(NamedTuple):
    """The 8-bit form of an absmax vector of ``blocks`` values."""

    codes: Tensor  # uint8 (blocks,)
    scale: Tensor  # float32 (groups,): the step between two codes
    offset: Tensor  # float32 (groups,): the group's minimum, what code 0 stands for


def groups(blocks: int) -> int:
    """Groups (scales and offsets) of ``blocks`` absmax values."""
    return -(-blocks // GROUP)


def stored_bytes(blocks: int) -> int:
    """Bytes of the 8-bit form of ``blocks`` absmax values: a code each, a float32 scale and offset per group."""
    return blocks + 8 * groups(blocks)


def _grouped(values: Tensor, fill: Tensor) -> Tensor:
    """(groups, GROUP) of the 1-D ``values``, the last group padded with ``fill`` (a 1-element tensor)."""
    pad = groups(values.numel()) * GROUP - values.numel()
    if pad:
        values = torch.cat([values, fill.expand(pad)])
    return values.view(-1, GROUP)


def encode(absmax: Tensor) -> DoubleQuantized:
    """The 8-bit form of ``absmax`` (float32 (blocks,), blocks >= 1), on its device."""
    if absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ValueError(f"nf4_stats.encode: absmax must be a non-empty 1-D float32 tensor, got {absmax.dtype} "
                         f"{tuple(absmax.shape)}")  # fmt: skip
    blocks = absmax.numel()
    grouped = _grouped(absmax, absmax[-1:])  # the last value again: the last group's min and max unchanged
    low, high = grouped.amin(dim=1), grouped.amax(dim=1)
    # A tensor divisor, not the number 255: CUDA multiplies by the reciprocal of a scalar divisor (not the IEEE
    # quotient, which the CPU computes), and the GPU's statistics would differ from the CPU's in the last bit.
    scale = (high - low) / torch.full_like(high, LEVELS)
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # equal values (scale 0): every code is 0
    ratio = (grouped - low.unsqueeze(1)) / step.unsqueeze(1)
    # NaN (a non-finite group) -> 0, so that its bytes are defined; its scale or offset decodes it to NaN anyway.
    codes = torch.nan_to_num(ratio.round(), nan=0.0).clamp(0, LEVELS).to(torch.uint8).view(-1)
    return DoubleQuantized(codes[:blocks].clone() if codes.numel() != blocks else codes, scale, low)


def decode(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The absmax (float32 (blocks,)) that :func:`encode`'s ``codes``, ``scale`` and ``offset`` stand for."""
    blocks = codes.numel()
    grouped = _grouped(codes, codes.new_zeros(1)).float()
    # Out of place, a multiply then an add: two roundings, the same on every device (no fused multiply-add).
    values = grouped * scale.unsqueeze(1) + offset.unsqueeze(1)
    return values.view(-1)[:blocks]


def check(stats: DoubleQuantized, blocks: int, where: str) -> None:
    """A ValueError unless ``stats`` has the dtypes and shapes of the 8-bit form of ``blocks`` absmax values."""
    want = [(torch.uint8, (blocks,)), (torch.float32, (groups(blocks),)), (torch.float32, (groups(blocks),))]
    got = [(t.dtype, tuple(t.shape)) for t in stats]
    if got != want:
        raise ValueError(f"{where}: the double-quantized absmax (codes, scale, offset) must be {want}, got {got}")
