"""InitConfig: every option of an initialisation, validated once, carried whole, and recorded in files."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.weights import lora_scaling
from .targets import check_pattern, value_for

INITS = ("pissa", "lora", "loftq")
QUANTIZERS = (None, "nf4")
COMPONENTS = ("principal", "minor")
#: The options each layer's ``info`` records (and so the adapter file): what made its initial factors.
RECORDED = ("init", "niter", "oversample", "seed", "components", "quantize", "quant_iters")
#: Default bound (bytes) on the extra memory a chunk of stacked weights and its workspace may take.
MEMORY_BUDGET = 1 << 30
#: The scalings s = alpha / r (or alpha / sqrt(r)) accepted: A and B hold sqrt(S / s), which leaves the float
#: range (or the output turns to inf * 0 = NaN) only far outside it; real runs use s from 1e-3 to a few hundred.
SCALING_RANGE = (1e-6, 1e6)


def scaling_error(alpha: float, rank: int, rslora: bool) -> str | None:
    """Why (alpha, rank, rslora) gives an unusable scaling, or None."""
    s = lora_scaling(alpha, rank, rslora)
    low, high = SCALING_RANGE
    if not low <= s <= high:
        return f"such that s = alpha / {'sqrt(r)' if rslora else 'r'} = {s:.3g} lies in [{low:g}, {high:g}]"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Seeds, power iterations, sketch columns and QPiSSA iterations are recorded in adapter files as JSON integers,
#: which the reader takes in the int64 range (records.py): what apply() accepts is what a file can hold.
INT64 = (-(2**63), 2**63)


def _is_count(value: object, low: int) -> bool:
    return _is_int(value) and low <= value < INT64[1]  # type: ignore[operator]


def check_recorded(options: Mapping[str, Any]) -> None:
    """A ValueError unless ``options`` (the :data:`RECORDED` keys) make a valid init: the one check of these options,
    run by :class:`InitConfig` on apply()'s arguments and by records.py on every module of a file."""
    init, components, niter, oversample = (options[k] for k in ("init", "components", "niter", "oversample"))
    seed, quantize, quant_iters = options["seed"], options["quantize"], options["quant_iters"]
    if init not in INITS:
        raise ValueError(f"minipissa: init must be one of {INITS}, got {init!r}")
    if components not in COMPONENTS:
        raise ValueError(f"minipissa: components must be 'principal' or 'minor', got {components!r}")
    if niter is not None and not _is_count(niter, 0):
        raise ValueError(f"minipissa: niter must be None (exact SVD) or an int in [0, 2**63), got {niter!r}")
    if niter is not None and components == "minor":
        raise ValueError(
            "minipissa: components='minor' needs the exact SVD (niter=None): a randomized range finder "
            "captures the top of the spectrum, never the bottom"
        )
    if oversample is not None and not _is_count(oversample, 0):
        raise ValueError(f"minipissa: oversample must be >= 0 and < 2**63, got {oversample!r}")
    if not _is_count(seed, INT64[0]):
        raise ValueError(f"minipissa: seed must be an int in [-2**63, 2**63) (int64), got {seed!r}")
    if quantize not in QUANTIZERS:
        raise ValueError(f"minipissa: quantize must be None or 'nf4', got {quantize!r}")
    if not _is_count(quant_iters, 1):
        raise ValueError(f"minipissa: quant_iters must be an int in [1, 2**63), got {quant_iters!r}")
    if quantize is None and (init == "loftq" or quant_iters != 1):
        raise ValueError(
            "minipissa: init='loftq' and quant_iters > 1 choose the adapter against a quantizer: pass "
            "quantize='nf4' too"
        )
    if init == "lora" and quant_iters != 1:
        raise ValueError("minipissa: init='lora' (QLoRA with quantize='nf4') has nothing to iterate: quant_iters=1")
    if quantize is not None and components == "minor":
        raise ValueError("minipissa: quantize='nf4' keeps the principal part out of the 4 bits: not with 'minor'")


@dataclass(frozen=True)
class InitConfig:
    """How :func:`minipissa.apply` initialises adapters (see its docstring for each option).

    ``rank`` and ``alpha`` may be mappings from target pattern to value (``"*"``: every other module);
    their per-module values are checked by :meth:`rank_for` / :meth:`alpha_for`. ``stack`` says where
    same-shape weights are stacked into batched decompositions: None (default) on GPUs only, where one
    kernel per chunk beats one per weight; True everywhere (e.g. to test that path on the CPU).
    ``quantize="nf4"`` stores each residual in 4 bits (QPiSSA; with ``init="lora"``, QLoRA; ``init="loftq"``
    needs it), choosing the adapter ``quant_iters`` times against the quantizer (qpissa.py).
    """

    rank: int | Mapping[str, int]
    alpha: float | Mapping[str, float] | None = None
    rslora: bool = False
    init: str = "pissa"
    niter: int | None = None
    oversample: int | None = None
    seed: int = 0
    components: str = "principal"
    dropout: float = 0.0
    adapter_dtype: torch.dtype | None = None
    memory_budget: int = MEMORY_BUDGET
    stack: bool | None = None
    quantize: str | None = None
    quant_iters: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "alpha"):  # a private copy: the user's dict may change after apply()
            value = getattr(self, name)
            if isinstance(value, Mapping):
                for key in value:  # patterns, as targets are ("*": every other module); values: rank_for/alpha_for
                    check_pattern(key, f"`{name}` key")
                object.__setattr__(self, name, dict(value))
        check_recorded(self.recorded())
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"minipissa: dropout must be in [0, 1), got {self.dropout!r}")
        if self.adapter_dtype is not None and not (
            isinstance(self.adapter_dtype, torch.dtype) and self.adapter_dtype.is_floating_point
        ):
            raise ValueError(
                f"minipissa: adapter_dtype must be a floating-point torch.dtype, got {self.adapter_dtype!r}"
            )
        if not (_is_int(self.memory_budget) and self.memory_budget > 0):
            raise ValueError(f"minipissa: memory_budget must be a positive int (bytes), got {self.memory_budget!r}")
        if not isinstance(self.rslora, bool) or self.stack not in (None, True, False):
            raise ValueError(f"minipissa: rslora and stack must be bools, got {self.rslora!r}, {self.stack!r}")

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``."""
        rank = value_for(name, self.rank, "rank")
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"minipissa: rank for module '{name}' must be an int >= 1, got {rank!r}")
        return rank

    def alpha_for(self, name: str, rank: int) -> float:
        """The alpha of module ``name``; default: its rank (so s = 1)."""
        alpha = float(rank) if self.alpha is None else value_for(name, self.alpha, "alpha", default=float(rank))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"minipissa: alpha for module '{name}' must be > 0 and finite, got {alpha!r}")
        error = scaling_error(alpha, rank, self.rslora)
        if error:
            raise ValueError(f"minipissa: alpha for module '{name}' must be {error}, got alpha = {alpha!r}")
        return float(alpha)

    @property
    def iterates(self) -> bool:
        """Whether the adapter is chosen more than once, against the quantizer (qpissa.py)."""
        return self.init == "loftq" or self.quant_iters > 1

    def stacks(self, device: torch.device) -> bool:
        """Whether weights on ``device`` are stacked into batched decompositions (QPiSSA's iterations too;
        LoftQ's and LoRA's inits run one weight at a time)."""
        if self.init != "pissa":
            return False
        return device.type != "cpu" if self.stack is None else self.stack

    def recorded(self) -> dict[str, Any]:
        """The options a layer's ``info`` (and so the adapter file) records."""
        return {key: getattr(self, key) for key in RECORDED}
