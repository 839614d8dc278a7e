"""apply(..., name=...) on a model that has adapters already: one more named adapter, the others unchanged.

On a target that already is a PiSSA layer the new adapter's initial factors come from the original weight. If its
settings (rank, alpha, rsLoRA and every recorded init option: init, niter, oversample, seed, components, quantize,
quant_iters) are those of an adapter of the layer that its residual was made from, they are that adapter's A0, B0:
no decomposition runs, and they are the factors apply() would make on the base (bit for bit on the CPU). Otherwise
the factor stream decomposes W~ = W_res0 + s0·B0·A0, rebuilt in the decomposition dtype: W up to W_res0's rounding
(a few units in its last place), so the factors are those of W to that rounding. A target that is no PiSSA layer yet
gets a new one through the one installer, as in any apply(). Every factor is made before anything changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.errors import StateError
from ..core.fingerprint import describe, fingerprint, hashes
from ..core.weights import residual_weight
from ..nn import adapters as per_layer
from ..nn.layer import PiSSALinear
from . import named, trained
from .config import InitConfig
from .factors import _refuse_unused_patterns, factors, nonfinite_factors, plan_modules, refuse_nonfinite
from .install import adapt
from .settings import Settings
from .targets import Targets, find_targets
from .tree import Plan, pissa_layers

Initial = tuple[Tensor, Tensor, dict[str, Any]]  # A0 (r, in), B0 (out, r) in host memory, the adapter's info


def add_adapter(
    model: nn.Module,
    cfg: InitConfig,
    targets: Targets,
    exclude: Targets | None,
    fan_in_fan_out: bool | None,
    name: str,
    progress: bool | Callable[[int, int], None],
    train_modules: Targets | None,
) -> trained.Run:
    """Adapter ``name`` on the ``targets`` of ``model`` (the bare one), which has PiSSA layers; see the module."""
    found = find_targets(model, targets, exclude, adapted=True)
    layers = [(n, m) for n, m in found if isinstance(m, PiSSALinear)]
    held = [n for n, layer in layers if per_layer.holder(layer, name) is not None]
    if held:
        raise ValueError(
            f"minipissa: module '{held[0]}' already is a PiSSALinear with an adapter named '{name}'; pass another "
            f"name= to add one more (the model has {named.adapter_names(model)})"
        )
    named.refuse_several(model, "apply", file_trained=train_modules is not None)
    named.refuse_busy(layers, "apply")
    plans = [_plan(n, layer, cfg) for n, layer in layers]
    fresh = [n for n, m in found if not isinstance(m, PiSSALinear)]
    fresh_cfg = _exactly(cfg, fresh)
    fresh_plans = (
        plan_modules(model, fresh_cfg, [f"re:{re.escape(n)}" for n in fresh], None, fan_in_fan_out) if fresh else []
    )
    _refuse_unused_patterns(cfg, [*plans, *fresh_plans])
    initial = [_initial(plan, layer, cfg) for plan, (_, layer) in zip(plans, layers, strict=True)]  # no change yet
    was_active, before = named.active(model), {id(layer) for _, layer in pissa_layers(model)}
    run = trained.Run()
    if fresh_plans:
        adapt(model, fresh_plans, fresh_cfg, progress, run=run)
    digests = hashes([t for a0, b0, _ in initial for t in (a0, b0)])
    for i, (plan, (_, layer), (a0, b0, info)) in enumerate(zip(plans, layers, initial, strict=True)):
        dtype = cfg.adapter_dtype or a0.dtype
        per_layer.add(
            layer, name, (a0.to(dtype), b0.to(dtype), a0, b0), alpha=plan.alpha, rslora=plan.rslora,
            dropout=plan.dropout, info=info, factors=(digests[2 * i], digests[2 * i + 1]),
            origin=trained.Origin(plan.name, run),
        )  # fmt: skip
    new = [layer for _, layer in pissa_layers(model) if id(layer) not in before]
    named.adopt(model, new, name, was_active)
    return run


def _exactly(cfg: InitConfig, names: Sequence[str]) -> InitConfig:
    """``cfg`` with each module's rank and alpha resolved, by exact name: plan_modules() of those modules alone
    then finds every pattern used (the patterns of ``cfg`` are checked over all the targets by the caller)."""
    if not names:
        return cfg
    ranks = {n: cfg.rank_for(n) for n in names}
    key = {n: f"re:{re.escape(n)}" for n in names}
    alpha = {key[n]: cfg.alpha_for(n, r) for n, r in ranks.items()}
    return dataclasses.replace(cfg, rank={key[n]: r for n, r in ranks.items()}, alpha=alpha)


def _plan(name: str, layer: PiSSALinear, cfg: InitConfig) -> Plan:
    """The plan of a new adapter on an existing layer (its module a shell that holds W~ while it is decomposed)."""
    rank = cfg.rank_for(name)
    if rank > min(layer.out_features, layer.in_features):
        raise ValueError(
            f"minipissa: rank {rank} exceeds min(out, in) = {min(layer.out_features, layer.in_features)} of module "
            f"'{name}' ({layer.out_features}x{layer.in_features}); use a per-module rank"
        )
    if bool(cfg.quantize) != layer.quantized:
        have = "a 4-bit (QPiSSA)" if layer.quantized else "a full-precision"
        raise StateError(
            f"minipissa.apply: module '{name}' holds {have} residual, and a layer keeps one residual for all its "
            f"adapters: quantize={cfg.quantize!r} cannot be added there; nothing was changed"
        )
    settings = Settings(rank, cfg.alpha_for(name, rank), cfg.rslora, layer.fan_in_fan_out, float(cfg.dropout),
                        cfg.adapter_dtype, cfg.quantize)  # fmt: skip
    return Plan(name, nn.Module(), settings)


def _same_init(layer: PiSSALinear, plan: Plan, cfg: InitConfig) -> Initial | None:
    """The initial factors (and info) of an adapter of the layer that its residual was made from, if it was made
    with the very settings of ``plan`` and ``cfg``: they are what the stream would make of W."""
    want = (plan.rank, plan.alpha, plan.rslora, *named.init_options(cfg.recorded()))
    for name in per_layer.names(layer):
        h = cast(per_layer.Holder, per_layer.holder(layer, name))
        mine = (h.rank, h.alpha, h.rslora, *named.init_options(h.info))
        if mine == want and per_layer.shares_residual(layer, h.A0, h.B0, h.scaling):
            return h.A0, h.B0, dict(h.info)
    return None


@torch.no_grad()
def _initial(plan: Plan, layer: PiSSALinear, cfg: InitConfig) -> Initial:
    """The new adapter's A0, B0 and info on an existing layer (see the module)."""
    same = _same_init(layer, plan, cfg)
    if same is not None:
        return same
    if layer.quantized:
        raise StateError(
            f"minipissa.apply: module '{plan.name}' holds a 4-bit (QPiSSA) residual, nf4(W - s0·B0·A0) of its own "
            "adapter's initialisation; an adapter initialised otherwise would need the codes of its own residual (the "
            "quantization error differs everywhere, and no low-rank term corrects it). Use the same settings as the "
            "layer's adapter (rank, alpha, init, seed, niter, ...), or apply to the full-precision base model"
        )
    a0, b0, s0 = layer.residual_init
    dtype = a0.dtype
    device = layer.A.device
    delta = s0 * (b0.to(device) @ a0.to(device))
    shell = plan.module
    shell.weight = layer.residual(dtype) + (delta.mT if layer.fan_in_fan_out else delta)  # W~, a new tensor
    try:
        (item,) = list(factors([plan], cfg))
        refuse_nonfinite(nonfinite_factors([item]), "initial factors")
        residual = residual_weight(
            shell.weight, item.a0, item.b0, plan.scaling, plan.fan_in_fan_out, layer.weight.dtype
        )
        info = cfg.recorded() | describe(item.sigma, layer.info["base_fingerprint"])
    finally:
        del shell.weight
    info |= {"bias_fingerprint": layer.info.get("bias_fingerprint"), "residual_fingerprint": fingerprint(residual)}
    return item.a0.cpu(), item.b0.cpu(), info
