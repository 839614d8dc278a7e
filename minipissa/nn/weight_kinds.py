"""What a PiSSA layer asks of its residual W_res, one answer per kind: dense (an ``nn.Parameter``) or 4-bit NF4
(an :class:`~minipissa.core.nf4.NF4Weight`, QPiSSA).

The layer holds the weight as stored (state-dict keys ``weight``, or ``weight.codes`` / ``weight.absmax``; FSDP2
holds the very Parameter) beside its kind, and asks the kind for the weight in a dtype, the bytes fingerprints cover,
the adapted linear map, the adapter folded in. A kind holds no state: the weight is passed in at each call, so that a
Parameter that FSDP2 or ``.to()`` swaps is never stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

from ..core.decompose import compute_dtype
from ..core.nf4 import NF4Weight
from ..core.weights import weight_matrix
from .ops import adapted_linear, quantized_adapted_linear


class WeightKind(Protocol):
    """The questions; ``weight`` is the layer's stored W_res of this kind."""

    quantized: bool  #: stored in 4 bits (QPiSSA)
    mergeable: bool  #: s·B·A can be folded into the stored weight without rounding the training away
    trains_bias: bool  #: :meth:`linear` gives an unfrozen bias its gradient
    follows_casts: bool  #: a module cast (``.half()``) changes the stored bytes

    def dequantize(self, weight: Any, dtype: torch.dtype | None) -> Tensor:
        """W_res in its stored layout, in ``dtype`` (default: the dtype it stands for)."""
        ...

    def stored(self, weight: Any) -> Tensor:
        """What fingerprints cover: the tensor as stored (NF4: the codes then the absmax bytes, uint8)."""
        ...

    def sha256(self, weight: Any) -> str | None:
        """The checksum a saved adapter keeps of the stored residual, if its kind keeps one."""
        ...

    def folded(self, weight: Any, delta: Tensor) -> Tensor:
        """W_res + delta (s·B·A in the stored layout), a new contiguous tensor in the weight's dtype."""
        ...

    def linear(
        self, x: Tensor, xa: Tensor | None, weight: Any, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
        fan_in_fan_out: bool,
    ) -> Tensor:  # fmt: skip
        """The adapted linear map, x (..., in) -> (..., out) (ops.py)."""
        ...


class DenseKind:
    """W_res as a full-precision tensor."""

    quantized, mergeable, trains_bias, follows_casts = False, True, True, True

    def dequantize(self, weight: Tensor, dtype: torch.dtype | None) -> Tensor:
        return weight if dtype is None else weight.to(dtype)

    def stored(self, weight: Tensor) -> Tensor:
        return weight

    def sha256(self, weight: Tensor) -> str | None:
        return None  # its fingerprint covers it

    def folded(self, weight: Tensor, delta: Tensor) -> Tensor:
        # In the decomposition dtype, as the residual was made: rounded once, into the weight's dtype.
        dtype = compute_dtype(weight.dtype)
        return (weight.to(dtype) + delta.to(dtype)).to(weight.dtype).contiguous()

    def linear(
        self, x: Tensor, xa: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
        fan_in_fan_out: bool,
    ) -> Tensor:  # fmt: skip
        return adapted_linear(x, xa, weight_matrix(weight, fan_in_fan_out), bias, a, b, scaling)


class NF4Kind:
    """W_res in 4-bit NF4: dequantized at each use; the adapter is never folded into it (B·A rounded into 4 bits
    would lose most of the training), only into a full-precision copy (:meth:`folded`, for unload)."""

    quantized, mergeable, trains_bias, follows_casts = True, False, False, False

    def dequantize(self, weight: NF4Weight, dtype: torch.dtype | None) -> Tensor:
        return weight.dequantize(dtype)

    def stored(self, weight: NF4Weight) -> Tensor:
        return weight.packed()

    def sha256(self, weight: NF4Weight) -> str | None:
        return weight.sha256()

    def folded(self, weight: NF4Weight, delta: Tensor) -> Tensor:
        # In the factors' dtype: the 4-bit weight has no precision of its own to keep.
        return (weight.dequantize(delta.dtype) + delta).to(weight.dtype).contiguous()

    def linear(
        self, x: Tensor, xa: Tensor | None, weight: NF4Weight, bias: Tensor | None, a: Tensor, b: Tensor,
        scaling: float, fan_in_fan_out: bool,
    ) -> Tensor:  # fmt: skip
        return quantized_adapted_linear(x, xa, weight, bias, a, b, scaling, fan_in_fan_out)


DENSE: WeightKind = DenseKind()
NF4: WeightKind = NF4Kind()


def refuse_merge(kinds: Iterable[tuple[str, WeightKind]]) -> None:
    """merge()'s one refusal, given every layer's (name, kind) before any is merged: a residual that cannot take
    s·B·A (4-bit)."""
    refused = [name for name, kind in kinds if not kind.mergeable]
    if refused:
        raise RuntimeError(
            f"minipissa.merge: module(s) {refused[:5]} hold a 4-bit NF4 residual (QPiSSA); folding s·B·A into 4 "
            "bits would round most of the training away, so nothing was merged. Keep the adapters separate, or "
            "minipissa.unload(model) for a full-precision model (deq(W_res) + s·B·A), or serve "
            "minipissa.convert_to_lora's LoRA on the original weights"
        )
