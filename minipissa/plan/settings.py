"""A module's adapter settings (:class:`Settings`): resolved by apply() from its options into each module's
:class:`~minipissa.plan.tree.Plan`, and recorded per module in the adapter file
(:class:`~minipissa.io.records.ModuleRecord`), which load() turns back into a Plan as it is. Their checks here are
the one check of these values, for apply()'s arguments and for a file's fields alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.checks import Check
from ..core.weights import lora_scaling

#: The scalings s = alpha / r (or alpha / sqrt(r)) accepted: A and B hold sqrt(S / s), which leaves the float
#: range (or the output turns to inf * 0 = NaN) only far outside it; real runs use s from 1e-3 to a few hundred.
SCALING_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class Settings:
    """How one module is adapted. ``adapter_dtype``: of A and B (None: the layer's default); ``quantize``: "nf4" if
    the residual is stored in 4 bits (QPiSSA)."""

    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool  # the weight is stored (in, out), as a GPT-2 Conv1D's
    dropout: float = 0.0
    adapter_dtype: torch.dtype | None = None
    quantize: str | None = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)


def check_rank(check: Check, rank: object) -> int:
    return check.integer(rank, "rank", low=1)


def check_alpha(check: Check, alpha: object, rank: int, rslora: bool) -> float:
    """``alpha`` as a float, checked: positive, finite, and giving a usable scaling with ``rank``."""
    value = check.number(alpha, "alpha", low=0.0, low_open=True)
    s, (low, high) = lora_scaling(value, rank, rslora), SCALING_RANGE
    if not low <= s <= high:
        root = "sqrt(r)" if rslora else "r"
        check.fail("alpha", f"such that s = alpha / {root} = {s:.3g} lies in [{low:g}, {high:g}]", alpha)
    return value


def check_dropout(check: Check, dropout: object) -> float:
    return check.number(dropout, "dropout", low=0.0, high=1.0, high_open=True)
