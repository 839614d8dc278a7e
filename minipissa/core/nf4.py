"""NF4: 4-bit NormalFloat storage of a frozen weight, code for code the same as bitsandbytes 0.50.2.

    codes, absmax = quantize(w)          # uint8 ((numel + 1) // 2,), float32 (ceil(numel / 64),)
    w_hat = dequantize(codes, absmax, w.shape, torch.bfloat16)

The flattened (row-major) weight is cut into blocks of 64 elements, each with a float32 absmax. A full block
is scaled by the reciprocal of its absmax (``x * (1 / absmax)``, as bitsandbytes does; a division differs in
a few codes in ten million), the partial last block by division (its absmax stored clamped to >= 1e-38);
each scaled value takes the nearest of the 16 code values, an exact midpoint the lower one. Two 4-bit indices
share a byte, the first in the high nibble; an odd count is padded with index 7 (the zero). Dequantization
multiplies in float32, then casts.

:class:`NF4Weight` holds one such weight as a module (the codes and absmax as buffers), so it moves with
``.to(device)`` and is saved under ``<module>.weight.codes`` / ``.absmax``. Double-quantized (``double_quant``, QLoRA's
scheme, :mod:`.nf4_stats`), the absmax is held in 8 bits instead: ``.absmax_codes`` (uint8, one per block),
``.absmax_scale`` and ``.absmax_offset`` (float32, one per 256 blocks); the 4-bit codes are the same either way.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from . import nf4_stats
from .fingerprint import raw_bytes

BLOCK = 64
#: The 16 NF4 code values (float32), index 0..15: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
#: Storage of the residual alone: 4 bits per element plus a float32 absmax per 64 (adapters and tables aside);
#: a 4096 x 11008 weight: 0.5625 bytes per element.
BYTES_PER_PARAM = 0.5 + 4 / BLOCK
#: The same, double-quantized: an 8-bit absmax per 64 and a float32 scale and offset per 64 * 256 elements; a
#: 4096 x 11008 weight: 0.51611 bytes per element (4.129 bits).
DQ_BYTES_PER_PARAM = 0.5 + 1 / BLOCK + 8 / (BLOCK * nf4_stats.GROUP)


#: The statistics' buffer names, by double quantization: the float32 absmax, or its 8-bit form (nf4_stats.py).
STATISTICS = {False: ("absmax",), True: ("absmax_codes", "absmax_scale", "absmax_offset")}


def stored_bytes(numel: int, double_quant: bool = False) -> int:
    """Bytes of the codes and statistics of a weight of ``numel`` elements (what :meth:`NF4Weight.packed` holds)."""
    blocks = -(-numel // BLOCK)
    return (numel + 1) // 2 + (nf4_stats.stored_bytes(blocks) if double_quant else 4 * blocks)


def code_table(device: torch.device | str | None = None) -> Tensor:
    """The 16 code values, float32."""
    return torch.tensor(CODE, dtype=torch.float32, device=device)


def pair_table(device: torch.device | str | None = None) -> Tensor:
    """(256, 2) float32: the two code values a packed byte stands for (high nibble first), so that
    dequantizing is one gather, one multiply and one cast."""
    code = code_table(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


@functools.cache
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """The code midpoints (15,) and the pair table on ``device``, made once: a tensor built from Python values
    on a GPU is a host-to-device copy that waits for the device, once per weight otherwise."""
    code = code_table(device)
    return (code[:-1] + code[1:]) / 2, pair_table(device)


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Packed codes (uint8, ((numel + 1) // 2,)) and absmax (float32, (ceil(numel / 64),)) of ``weight``.

    Float32, bfloat16 and float16 are quantized from their float32 values; runs on the weight's device.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"minipissa.nf4: only float32/bfloat16/float16 weights are quantized, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    numel = flat.numel()
    full = numel - numel % BLOCK
    blocks = flat[:full].view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # Only the scale is clamped (1e-38, as bitsandbytes): an all-zero or all-subnormal block maps to 0 -> index 7.
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)]
    if full < numel:  # bitsandbytes stores the partial last block's absmax clamped (a zero tail: 1e-38)
        tail = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        scaled.append(flat[full:] / tail)
    if numel % 2:
        scaled.append(flat.new_zeros(1))  # index 7
    values = torch.cat(scaled) if len(scaled) > 1 else scaled[0]
    # bucketize with right=False puts a value equal to a midpoint into the lower bucket: ties go to the lower index.
    index = torch.bucketize(values, _tables(weight.device)[0], out_int32=True).to(torch.uint8)
    return (index[0::2] << 4) | index[1::2], absmax


def dequantize(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype, table: Tensor | None = None
) -> Tensor:
    """The weight of ``shape`` in ``dtype`` from its packed ``codes`` and ``absmax`` (computed in float32).

    ``table``: :func:`pair_table` on the codes' device (pass it to avoid building it on every call)."""
    numel = math.prod(shape)
    # int32 indices (not int64) and the multiply written straight in ``dtype`` (computed in float32, rounded once on
    # the write, as a multiply then a cast would): three passes over the weight in eager mode.
    pairs = (_tables(codes.device)[1] if table is None else table)[codes.int()]  # ((numel + 1) // 2, 2)
    values = pairs.view(-1)
    blocks = absmax.numel()
    if numel != blocks * BLOCK or values.numel() != numel:  # a partial last block, or an odd count's padding
        padded = values.new_zeros(blocks * BLOCK)
        padded[:numel] = values[:numel]
        values = padded
    out = torch.empty(blocks, BLOCK, dtype=dtype, device=codes.device)
    torch.mul(values.view(blocks, BLOCK), absmax.unsqueeze(1), out=out)
    return out.view(-1)[:numel].view(shape)


class NF4Weight(nn.Module):
    """A frozen weight stored in NF4: ``codes`` (uint8) and ``absmax`` (float32) buffers, no full-precision copy; or,
    double-quantized (:attr:`double_quant`), ``codes`` and the 8-bit absmax: ``absmax_codes`` (uint8),
    ``absmax_scale`` and ``absmax_offset`` (float32), :data:`STATISTICS` (:mod:`.nf4_stats`).

    Attributes:
        shape: the weight's stored shape, e.g. (out, in) for ``nn.Linear``.
        dtype: the dtype it was quantized from (what :meth:`dequantize` gives by default), or the module's dtype
            after a cast (``.half()``, ``.to(torch.bfloat16)``), which changes nothing stored.
    """

    codes: Tensor
    table: Tensor

    def __init__(
        self, codes: Tensor, absmax: Tensor | nf4_stats.DoubleQuantized, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        """``absmax``: float32 (ceil(numel / 64),), or its 8-bit form (:func:`nf4_stats.encode`)."""
        super().__init__()
        numel = math.prod(shape)
        blocks = -(-numel // BLOCK)
        if codes.dtype != torch.uint8 or codes.shape != ((numel + 1) // 2,):
            raise ValueError(f"NF4Weight: codes must be uint8 of shape ({(numel + 1) // 2},) for {shape}")
        if isinstance(absmax, nf4_stats.DoubleQuantized):
            nf4_stats.check(absmax, blocks, f"NF4Weight of shape {shape}")
        elif absmax.dtype != torch.float32 or absmax.shape != (blocks,):
            raise ValueError(f"NF4Weight: absmax must be float32 of shape ({blocks},) for {shape}")
        self.shape, self.dtype = tuple(shape), dtype
        self.register_buffer("codes", codes)
        stats = absmax if isinstance(absmax, nf4_stats.DoubleQuantized) else (absmax,)
        for name, t in zip(STATISTICS[len(stats) > 1], stats, strict=True):
            self.register_buffer(name, t)
        self.register_buffer("table", _tables(codes.device)[1].clone(), persistent=False)  # clone: no host copy

    @classmethod
    def quantized(cls, weight: Tensor, dtype: torch.dtype | None = None, double_quant: bool = False) -> NF4Weight:
        """``weight`` quantized; ``dtype``: what it stands for (default: the weight's own dtype); ``double_quant``:
        its absmax in 8 bits (the 4-bit codes are the same)."""
        codes, absmax = quantize(weight)
        stats = nf4_stats.encode(absmax) if double_quant else absmax
        return cls(codes, stats, tuple(weight.shape), dtype or weight.dtype)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax is held in 8 bits."""
        return STATISTICS[True][0] in self._buffers

    def statistics(self) -> tuple[Tensor, ...]:
        """The stored statistics, in the order of :data:`STATISTICS`: (absmax,) or (absmax_codes, scale, offset)."""
        return tuple(cast(Tensor, self._buffers[name]) for name in STATISTICS[self.double_quant])

    def absmax_values(self) -> Tensor:
        """The float32 absmax (ceil(numel / 64),) that dequantization scales by: as stored, or decoded."""
        stats = self.statistics()
        return stats[0] if len(stats) == 1 else nf4_stats.decode(*stats)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight (``shape``) in ``dtype`` (default: the dtype it stands for)."""
        return dequantize(self.codes, self.absmax_values(), self.shape, dtype or self.dtype, self.table)

    def packed(self) -> Tensor:
        """The codes and the statistics' bytes as one uint8 tensor: what fingerprints and checksums cover."""
        return torch.cat([self.codes, *(t.view(torch.uint8) for t in self.statistics())])

    def sha256(self) -> str:
        """sha256 of the codes then the statistics' bytes (little-endian float32 absmax; or the absmax codes, the
        scales, the offsets), computed on the CPU."""
        digest = hashlib.sha256()
        for t in (self.codes, *self.statistics()):
            digest.update(raw_bytes(t))
        return digest.hexdigest()

    @property
    def bytes(self) -> int:
        """Bytes of the stored codes and statistics."""
        return sum(t.numel() * t.element_size() for t in (self.codes, *self.statistics()))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # .half() / .to(dtype) must not round absmax or the table: they follow device moves only. The dtype the weight
        # stands for follows the cast, as a dense weight's would, so that a QPiSSA model cast to float16 unloads (and
        # saves its residual, and is loaded into) a float16 model, not a mix of float16 biases and float32 weights.
        cast = fn(torch.empty(0, dtype=self.dtype, device=self.codes.device))
        if cast.is_floating_point():
            self.dtype = cast.dtype

        def device_only(t: Tensor) -> Tensor:
            return t.to(device=fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)

        return super()._apply(device_only, recurse)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, double_quant={self.double_quant}, bytes={self.bytes}"
