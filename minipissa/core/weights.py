"""A target layer's weight as PiSSA sees it: its layout (``nn.Linear`` stores W as (out, in), a GPT-2 style
``Conv1D`` as (in, out): "fan_in_fan_out"), the scaling s, and the one function that makes W_res = W - s B0 A0."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers-style ``Conv1D`` (weight (in, out), attribute ``nf`` = out).

    Detected by structure so that minipissa never imports transformers.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def weight_matrix(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """The (out, in) view of a stored weight."""
    return weight.mT if fan_in_fan_out else weight


def residual_weight(
    weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """W_res = W - s * B0 A0 in the factors' dtype, returned in ``dtype`` (default: ``weight``'s) and its layout.

    This one function computes the residual at init and at reload, so a reload is bit-exact. (QPiSSA asks for
    the factors' dtype: the residual is quantized from it, with no rounding to the weight's dtype first.)

    Args:
        weight: stored base weight, (out, in), or (in, out) when ``fan_in_fan_out``.
        a0: (r, in). b0: (out, r).
    """
    delta = b0 @ a0 if scaling == 1.0 else scaling * (b0 @ a0)  # x 1.0 is exact: skip that pass
    if fan_in_fan_out:
        delta = delta.mT
    # Type promotion computes in the factors' dtype, as weight.to(a0.dtype) - delta would, and `out` rounds each
    # element once into the result's dtype as it is stored: no copy of W in the factors' dtype, nor of the difference.
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    return torch.sub(weight, delta, out=out)


def factor_rank(a0: Tensor, b0: Tensor, out_features: int, in_features: int) -> int:
    """The rank r of factors A0 (r, in), B0 (out, r), checked to fit a weight of (out, in)."""
    rank = a0.shape[0]
    if a0.shape != (rank, in_features) or b0.shape != (out_features, rank):
        raise ValueError(
            f"PiSSALinear: factors A0 {tuple(a0.shape)} and B0 {tuple(b0.shape)} do not fit a "
            f"weight of (out, in) = ({out_features}, {in_features}); expected ({rank}, {in_features}) "
            f"and ({out_features}, {rank})"
        )
    return rank


def frozen(t: Tensor) -> nn.Parameter:
    """``t`` as a frozen Parameter: the very Parameter where it is one (FSDP2 may hold it)."""
    param = t if isinstance(t, nn.Parameter) else nn.Parameter(t)
    param.requires_grad_(False)
    return param


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / rank**0.5 if rslora else alpha / rank
