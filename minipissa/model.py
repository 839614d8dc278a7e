"""Whole-model operations: apply(), merge/unmerge/unload, original()/disabled() contexts."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from . import batching, casts, decompose, distributed
from .fingerprint import describe, fingerprint_later, read_all
from .layer import PiSSALinear, is_conv1d, lora_scaling, weight_matrix
from .targets import Targets, find_targets, value_for

INITS = ("pissa", "lora")


def pissa_layers(model: nn.Module) -> Iterator[tuple[str, PiSSALinear]]:
    """(full name, layer) for every PiSSALinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, PiSSALinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


@dataclass
class _Plan:
    name: str
    module: nn.Module
    rank: int
    alpha: float
    fan_in_fan_out: bool

    def layer(
        self,
        a0: Tensor,
        b0: Tensor,
        info: dict,
        *,
        rslora: bool,
        dropout: float,
        adapter_dtype: torch.dtype | None,
        base_is_residual: bool = False,
    ) -> PiSSALinear:
        """The PiSSALinear replacing this plan's module (which it takes the tensors of)."""
        return PiSSALinear(
            self.module, a0, b0, alpha=self.alpha, rslora=rslora, dropout=dropout, fan_in_fan_out=self.fan_in_fan_out,
            adapter_dtype=adapter_dtype, info=info, base_is_residual=base_is_residual,
        )  # fmt: skip


def _plan(
    model: nn.Module,
    rank: int | Mapping[str, int],
    alpha: float | Mapping[str, float] | None,
    targets: Targets,
    exclude: Targets | None,
    fan_in_fan_out: bool | None,
) -> list[_Plan]:
    """Check every matched module before anything is changed."""
    plans = []
    for name, module in find_targets(model, targets, exclude):
        weight = cast(Tensor, module.weight)
        if weight.is_meta or not weight.is_floating_point():
            raise TypeError(
                f"minipissa: module '{name}' has a {'meta' if weight.is_meta else str(weight.dtype)} weight; "
                "PiSSA needs the real floating-point weight to decompose. Load the weights (and dequantize "
                "quantized layers) before apply(), or `exclude` this module."
            )
        r = value_for(name, rank, "rank")
        flip = is_conv1d(module) if fan_in_fan_out is None else fan_in_fan_out
        out_features, in_features = weight_matrix(weight, flip).shape
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"minipissa: rank for module '{name}' must be an int >= 1, got {r!r}")
        if r > min(out_features, in_features):
            raise ValueError(
                f"minipissa: rank {r} exceeds min(out, in) = {min(out_features, in_features)} of module "
                f"'{name}' ({out_features}x{in_features}); use a per-module rank, e.g. "
                f"rank={{'*': {r}, '{name}': {min(out_features, in_features)}}}, or exclude=['{name}']"
            )
        a = value_for(name, alpha, "alpha", default=float(r)) if alpha is not None else float(r)
        if not a > 0:
            raise ValueError(f"minipissa: alpha for module '{name}' must be > 0, got {a!r}")
        plans.append(_Plan(name, module, r, float(a), flip))
    return plans


def initial_factors(
    weight: Tensor,
    name: str,
    rank: int,
    scaling: float,
    *,
    fan_in_fan_out: bool,
    init: str = "pissa",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    components: str = "principal",
) -> tuple[Tensor, Tensor, Tensor]:
    """A0 (r, in), B0 (out, r) and the kept singular values (r,) for one module's weight.

    Randomness (the sketch, LoRA's A) comes from a generator seeded by (seed, name) alone.
    """
    dtype = decompose.compute_dtype(weight.dtype)
    matrix = weight_matrix(weight.detach(), fan_in_fan_out).to(dtype)
    out_features, in_features = matrix.shape
    if init == "lora":
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA do: bound = 1 / sqrt(in).
        generator = torch.Generator().manual_seed(decompose.module_seed(seed, name))
        a0 = (torch.rand(rank, in_features, generator=generator, dtype=dtype) * 2 - 1) / math.sqrt(in_features)
        return a0.to(matrix.device), matrix.new_zeros(out_features, rank), matrix.new_zeros(0)
    omega = None
    if niter is not None:
        columns = decompose.sketch_columns(rank, oversample, out_features, in_features)
        omega = decompose.sketch(in_features, columns, decompose.module_seed(seed, name), dtype, matrix.device)
    return decompose.principal_factors(matrix, rank, scaling, niter=niter, omega=omega, components=components)


def apply(
    model: nn.Module,
    rank: int | Mapping[str, int],
    targets: Targets,
    *,
    alpha: float | Mapping[str, float] | None = None,
    rslora: bool = False,
    init: str = "pissa",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    components: str = "principal",
    dropout: float = 0.0,
    exclude: Targets | None = None,
    fan_in_fan_out: bool | None = None,
    adapter_dtype: torch.dtype | None = None,
    memory_budget: int = batching.MEMORY_BUDGET,
    progress: bool | Callable[[int, int], None] = False,
) -> nn.Module:
    """Replace the target layers of ``model`` by PiSSALinear layers, in place, and return it.

    Args:
        rank: adapter rank, or a mapping from target pattern to rank ('*' = every other module).
        targets: module name, suffix, 're:' regex or compiled regex, a list of them, or 'all-linear'
            (every Linear/Conv1D but the output head).
        alpha: LoRA alpha (int/float or mapping like ``rank``); default = the module's rank, so s = 1.
        rslora: scaling alpha / sqrt(r) instead of alpha / r.
        init: 'pissa', or 'lora' (Kaiming-uniform A, zero B, base untouched) for comparisons.
        niter: None for the exact top-r (float64 Gram eigendecomposition, refined; see
            ``decompose.gram_principal``); an int for a randomized SVD with that many power iterations.
        oversample: extra sketch columns for the randomized SVD; default 4 * rank.
        seed: seeds each module's own generator together with its name; the global RNG is untouched.
        components: 'principal' (PiSSA) or 'minor' (MiLoRA: bottom r triplets; exact SVD only).
        dropout: dropout on the adapter's input only.
        exclude: patterns (same forms as ``targets``) never to adapt.
        fan_in_fan_out: force the weight layout; default detects Conv1D (weight stored (in, out)).
        adapter_dtype: dtype of the trainable A and B; default float32 (float64 for float64 weights).
        memory_budget: bytes of extra memory the batched decomposition may use at once (weights of
            one shape are stacked and decomposed together in chunks of this size); default 1 GiB.
        progress: ``progress(done, total)`` is called after each adapted module; True shows a tqdm
            bar when tqdm is installed. The time taken is in :func:`summary`.

    After apply, only the A and B parameters require gradients.
    """
    start = time.perf_counter()
    if init not in INITS:
        raise ValueError(f"minipissa: init must be one of {INITS}, got {init!r}")
    if components not in ("principal", "minor"):
        raise ValueError(f"minipissa: components must be 'principal' or 'minor', got {components!r}")
    if niter is not None and (not isinstance(niter, int) or niter < 0):
        raise ValueError(f"minipissa: niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    if niter is not None and components == "minor":
        raise ValueError(
            "minipissa: components='minor' needs the exact SVD (niter=None): a randomized range finder "
            "captures the top of the spectrum, never the bottom"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"minipissa: dropout must be in [0, 1), got {dropout}")
    if oversample is not None and oversample < 0:
        raise ValueError(f"minipissa: oversample must be >= 0, got {oversample}")
    plans = _plan(model, rank, alpha, targets, exclude, fan_in_fan_out)
    if distributed.any_sharded(p.module.weight for p in plans):  # FSDP2 / DTensor weights: one owner rank each
        options = dict(init=init, niter=niter, oversample=oversample, seed=seed, components=components)
        plans = distributed.init_sharded(
            model, plans, options, rslora=rslora, dropout=dropout, adapter_dtype=adapter_dtype
        )

    jobs = [
        batching.Job(p.name, p.module, p.rank, lora_scaling(p.alpha, p.rank, rslora), p.fan_in_fan_out) for p in plans
    ]
    factors: Iterator[tuple[batching.Job, Tensor, Tensor, Tensor]]
    if init == "lora":
        factors = (
            (
                j,
                *initial_factors(
                    j.weight, j.name, j.rank, j.scaling, fan_in_fan_out=j.fan_in_fan_out, init=init, seed=seed
                ),
            )
            for j in jobs
        )
    else:  # grouped by shape and chunked to memory_budget: one batched decomposition per chunk
        factors = batching.factors(
            jobs, niter=niter, oversample=oversample, seed=seed, components=components, memory_budget=memory_budget
        )
    report = batching.progress_reporter(progress, len(jobs))
    plan_of = {p.name: p for p in plans}
    pending = []  # read back after the loop: a read inside it would stall the GPU once per module
    for done, (job, a0, b0, sigma) in enumerate(factors, 1):
        plan, weight = plan_of[job.name], job.weight
        options = {"init": init, "niter": niter, "oversample": oversample, "seed": seed, "components": components}
        base_print = fingerprint_later(weight)  # the residual's is taken when saving (state.records)
        layer = plan.layer(a0, b0, options, rslora=rslora, dropout=dropout, adapter_dtype=adapter_dtype)
        pending.append((layer, sigma, base_print))
        _replace(model, plan.name, layer)
        del job, weight, a0, b0  # let the replaced weight go before the next chunk is stacked
        report(done)
    prints = read_all([base for _, _, base in pending])
    for (layer, sigma, _), base in zip(pending, prints, strict=True):
        layer.info.update(describe(sigma, base))

    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in pissa_layers(model):
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)
    casts.install(model)
    model.__dict__["_minipissa_seconds"] = time.perf_counter() - start
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (faster inference); :func:`unmerge` restores exactly.

    Keeps each residual while merged: one extra weight's memory per adapted layer.
    """
    distributed.refuse_sharded(model, "merge")
    for _, layer in pissa_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, bit-exactly."""
    for _, layer in pissa_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge and put the original Linear/Conv1D classes back: the fine-tuned model, no minipissa left."""
    distributed.refuse_sharded(model, "unload")
    for name, layer in list(pissa_layers(model)):
        _replace(model, name, layer.unload())
    model.__dict__.pop("_minipissa_seconds", None)
    casts.remove(model)
    return model


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    layers = [layer for _, layer in pissa_layers(model)]
    if not layers:
        raise ValueError("minipissa: the model has no PiSSA layers")
    if any(layer.merged for layer in layers):
        raise RuntimeError(f"minipissa.{mode}(): the model is merged; call minipissa.unmerge(model) first")
    before = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
    try:
        yield model
    finally:
        for layer, previous in zip(layers, before, strict=True):
            layer.mode = previous


def original(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside ``with minipissa.original(model):`` the model computes the exact pre-PiSSA function
    (W_res + s·B0·A0), e.g. as a DPO/KL reference, whatever training did to A and B."""
    return _mode(model, "original")


def disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside ``with minipissa.disabled(model):`` the adapters are off: the residual model alone."""
    return _mode(model, "disabled")
