"""InitConfig: every option of an initialisation, validated once, carried whole, and recorded in files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.checks import INT64, Check
from .settings import check_alpha, check_dropout, check_rank
from .targets import check_pattern, value_for

INITS = ("pissa", "lora", "loftq")
QUANTIZERS = (None, "nf4")
COMPONENTS = ("principal", "minor")
#: The options each layer's ``info`` records (and so the adapter file): what made its initial factors.
RECORDED = ("init", "niter", "oversample", "seed", "components", "quantize", "quant_iters", "double_quant")
#: Recorded options left out of ``info`` while they hold their default (given here): files that do not use them stay
#: what they were, readable by the versions of minipissa that knew nothing of them.
UNLESS_DEFAULT = {"double_quant": False}
#: Default bound (bytes) on the extra memory a chunk of stacked weights and its workspace may take.
MEMORY_BUDGET = 1 << 30
#: apply()'s arguments: checked as a file's fields are, with a ValueError.
ARGUMENTS = Check("minipissa")


def check_recorded(options: Mapping[str, Any], check: Check) -> None:
    """Fails ``check`` unless ``options`` (the :data:`RECORDED` keys) make a valid init: the one check of these
    options, run by :class:`InitConfig` on apply()'s arguments and by records.py on every module of a file. Counts and
    seeds are taken in the int64 range, as a file's JSON integers are read: what apply() accepts, a file can hold."""
    init = check.text(options["init"], "init", INITS)
    components = check.text(options["components"], "components", COMPONENTS)
    niter, oversample, quantize, quant_iters = (options[k] for k in ("niter", "oversample", "quantize", "quant_iters"))
    if niter is not None:
        check.integer(niter, "niter", 0, expected="None (exact SVD) or an int in [0, 2**63)")
    if niter is not None and components == "minor":
        check.refuse(
            "components='minor' needs the exact SVD (niter=None): a randomized range finder captures the top of the "
            "spectrum, never the bottom"
        )
    if oversample is not None:
        check.integer(oversample, "oversample", 0, expected=">= 0 and < 2**63")
    check.integer(options["seed"], "seed", INT64[0], expected="an int in [-2**63, 2**63) (int64)")
    if quantize not in QUANTIZERS:
        check.fail("quantize", "None or 'nf4'", quantize)
    check.integer(quant_iters, "quant_iters", 1, expected="an int in [1, 2**63)")
    double_quant = check.boolean(options.get("double_quant", False), "double_quant")
    if double_quant and quantize is None:
        check.refuse("double_quant=True stores the 4-bit residual's absmax in 8 bits: pass quantize='nf4' too")
    if quantize is None and (init == "loftq" or quant_iters != 1):
        check.refuse("init='loftq' and quant_iters > 1 choose the adapter against a quantizer: pass quantize='nf4' too")
    if init == "lora" and quant_iters != 1:
        check.refuse("init='lora' (QLoRA with quantize='nf4') has nothing to iterate: quant_iters=1")
    if quantize is not None and components == "minor":
        check.refuse("quantize='nf4' keeps the principal part out of the 4 bits: not with 'minor'")


@dataclass(frozen=True)
class InitConfig:
    """Every option of how :func:`minipissa.apply` initialises adapters, checked when made (a ValueError naming the
    option): ``minipissa.apply(model, config=InitConfig(rank=16), targets=[...])`` does what
    ``minipissa.apply(model, rank=16, targets=[...])`` does. One config may serve several models or runs.

    Attributes:
        rank: adapter rank, or a mapping from target pattern to rank ('*' = every other module).
        alpha: LoRA alpha (int/float or mapping like ``rank``); default = the module's rank, so s = 1.
        rslora: scaling alpha / sqrt(r) instead of alpha / r.
        init: 'pissa', or 'lora' (Kaiming-uniform A, zero B, base untouched) for comparisons, or 'loftq'
            (with ``quantize``: the adapter chosen from the quantization error of W, LoftQ's alternation).
        niter: None for the exact top-r (float64 Gram eigendecomposition, refined; see
            ``decompose.start``); an int for a randomized SVD with that many power iterations.
        oversample: extra sketch columns for the randomized SVD; default 4 * rank.
        seed: seeds each module's own generator together with its name; the global RNG is untouched.
        components: 'principal' (PiSSA) or 'minor' (MiLoRA: bottom r triplets; exact SVD only).
        dropout: dropout on the adapter's input only.
        adapter_dtype: dtype of the trainable A and B; default float32 (float64 for float64 weights).
        memory_budget: bytes of extra memory the decompositions may use at once (on a GPU, weights of
            one shape are stacked and decomposed together in chunks of this size); default 1 GiB.
        stack: where same-shape weights are stacked into batched decompositions: None (default) on GPUs only,
            where one kernel per chunk beats one kernel per weight; True everywhere (the CPU too: to run, or
            test, the GPU's road on the CPU); False nowhere. Factors are the same either way, to rounding.
        quantize: None, or 'nf4' (QPiSSA): each residual is stored in 4-bit NF4, bit-compatible with
            bitsandbytes (the decomposition runs in full precision first; with init='lora', QLoRA).
        quant_iters: with ``quantize``, how many times the adapter is chosen against the quantizer: the top-r of
            W, then ``quant_iters - 1`` times the top-r of W - deq(nf4(W - P)) (the authors' multi-iteration
            QPiSSA; 5 in their checkpoints); with init='loftq', LoftQ's iterations.
        double_quant: with ``quantize``, each NF4 absmax (one per 64 weights) is stored in 8 bits, with a float32
            scale and offset per 256 of them (QLoRA's double quantization, deterministic: core/nf4_stats.py):
            0.516 bytes per weight instead of 0.5625; the 4-bit codes are the same, and the iterations choose the
            adapter against this quantizer.
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
    double_quant: bool = False

    def __post_init__(self) -> None:
        for name in ("rank", "alpha"):  # a private copy: the user's dict may change after apply()
            value = getattr(self, name)
            if isinstance(value, Mapping):
                for key in value:  # patterns, as targets are ("*": every other module); values: rank_for/alpha_for
                    check_pattern(key, f"`{name}` key")
                object.__setattr__(self, name, dict(value))
        check_recorded(self.recorded(), ARGUMENTS)
        check_dropout(ARGUMENTS, self.dropout)
        ARGUMENTS.boolean(self.rslora, "rslora")
        if self.adapter_dtype is not None and not (
            isinstance(self.adapter_dtype, torch.dtype) and self.adapter_dtype.is_floating_point
        ):
            ARGUMENTS.fail("adapter_dtype", "a floating-point torch.dtype", self.adapter_dtype)
        ARGUMENTS.integer(self.memory_budget, "memory_budget", 1, expected="a positive int (bytes)")
        if self.stack not in (None, True, False):
            ARGUMENTS.fail("stack", "None, True or False", self.stack)

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``."""
        return check_rank(ARGUMENTS.within(f"module '{name}'"), value_for(name, self.rank, "rank"))

    def alpha_for(self, name: str, rank: int) -> float:
        """The alpha of module ``name``; default: its rank (so s = 1)."""
        alpha = float(rank) if self.alpha is None else value_for(name, self.alpha, "alpha", default=float(rank))
        return check_alpha(ARGUMENTS.within(f"module '{name}'"), alpha, rank, self.rslora)

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
        """The options a layer's ``info`` (and so the adapter file) records (those of :data:`UNLESS_DEFAULT` only where
        they differ from it)."""
        options = {key: getattr(self, key) for key in RECORDED}
        return {k: v for k, v in options.items() if k not in UNLESS_DEFAULT or v is not UNLESS_DEFAULT[k]}
