"""Whole-model operations: apply(), merge/unmerge/unload, original()/disabled() contexts."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import casts, report
from .config import MEMORY_BUDGET, InitConfig
from .fingerprint import describe, read_all
from .init import factors, plan_modules, progress_reporter
from .sharded.dtensor import is_dtensor, refuse_sharded
from .sharded.fsdp import FsdpAdoption
from .sharded.init import check_layouts, sharded_factors
from .targets import Targets
from .tree import Plan, build_layer, pissa_layers, replace_module, train_adapters_only


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
    memory_budget: int = MEMORY_BUDGET,
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
            ``decompose.start``); an int for a randomized SVD with that many power iterations.
        oversample: extra sketch columns for the randomized SVD; default 4 * rank.
        seed: seeds each module's own generator together with its name; the global RNG is untouched.
        components: 'principal' (PiSSA) or 'minor' (MiLoRA: bottom r triplets; exact SVD only).
        dropout: dropout on the adapter's input only.
        exclude: patterns (same forms as ``targets``) never to adapt.
        fan_in_fan_out: force the weight layout; default detects Conv1D (weight stored (in, out)).
        adapter_dtype: dtype of the trainable A and B; default float32 (float64 for float64 weights).
        memory_budget: bytes of extra memory the decompositions may use at once (on a GPU, weights of
            one shape are stacked and decomposed together in chunks of this size); default 1 GiB.
        progress: ``progress(done, total)`` is called after each adapted module; True shows a tqdm
            bar when tqdm is installed. The time taken is in :func:`summary`.

    After apply, only the A and B parameters require gradients.
    """
    start = time.perf_counter()
    cfg = InitConfig(
        rank, alpha, rslora, init, niter, oversample, seed, components, dropout, adapter_dtype, memory_budget
    )
    adapt(model, plan_modules(model, cfg, targets, exclude, fan_in_fan_out), cfg, progress)
    report.record_init_time(model, time.perf_counter() - start)
    return model


def adapt(
    model: nn.Module, plans: Sequence[Plan], cfg: InitConfig, progress: bool | Callable[[int, int], None] = False
) -> None:
    """apply() after planning: the factor stream, each layer built and put in place as its factors come
    (so that its weight is freed before the next chunk is stacked), then only A and B left trainable."""
    sharded = [p for p in plans if is_dtensor(p.weight)]
    plain = [p for p in plans if not is_dtensor(p.weight)]
    fsdp = None
    if sharded:  # FSDP2 / DTensor weights: each factored on one owner rank; checked before anything changes
        check_layouts(sharded)
        fsdp = FsdpAdoption(model, sharded)
    report_progress = progress_reporter(progress, len(plans))
    built = []
    stream = itertools.chain(sharded_factors(sharded, cfg), factors(plain, cfg))
    for done, item in enumerate(stream, 1):
        layer = build_layer(item.plan, item.a0, item.b0, cfg.recorded(), weight_is_residual=item.weight_is_residual)
        replace_module(model, item.plan.name, layer)
        if fsdp is not None:
            fsdp.adopt(item.plan.module, layer)
        built.append((layer, item.sigma, item.base_print))
        del item, layer  # let the replaced weight go before the next chunk is stacked
        report_progress(done)
    prints = read_all([base for _, _, base in built])  # one read-back: a read per module would stall a GPU
    for (layer, sigma, _), base in zip(built, prints, strict=True):
        layer.info.update(describe(sigma, base))
    train_adapters_only(model)
    casts.install(model, [layer for _, layer in pissa_layers(model)])


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (faster inference); :func:`unmerge` restores exactly.

    Keeps each residual while merged: one extra weight's memory per adapted layer.
    """
    refuse_sharded(model, "merge")
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
    refuse_sharded(model, "unload")
    layers = list(pissa_layers(model))
    casts.remove([layer for _, layer in layers])
    for name, layer in layers:
        replace_module(model, name, layer.unload())
    report.record_init_time(model, None)
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
