"""The initialisation pipeline's first half: which modules, with which settings (:func:`plan_modules`), and the one
stream of their initial factors (:func:`factors`).

    apply():  InitConfig -> plan_modules() -> factors() -> install.adapt() (build, replace, freeze)

The stream covers every kind of init: LoRA's random A0 and zero B0, the exact or randomized top-r (or
bottom-r) factors of each weight one at a time, and, on GPUs, same-shape weights stacked into batched
decompositions (stacked.py). Sharded weights take the same per-matrix road on an owner rank
(sharded/factors.py calls :func:`initial_factors`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core import decompose, qpissa
from ..core.dtypes import dtype_name
from ..core.errors import as_module
from ..core.weights import is_conv1d, residual_weight, weight_matrix
from . import quantized_base
from . import stacked as batching
from .config import InitConfig
from .fetch import IN_PLACE, Streamed, Weights
from .settings import Settings
from .targets import Targets, find_targets, matches, shared_tensors
from .tree import Plan


def plan_modules(
    model: nn.Module,
    cfg: InitConfig,
    targets: Targets,
    exclude: Targets | None = None,
    fan_in_fan_out: bool | None = None,
    sourced: bool = False,
) -> list[Plan]:
    """One :class:`Plan` per matched module, every setting checked before anything is changed. ``sourced``: the
    weights' values come from elsewhere (apply's ``weights=``), so a meta weight is expected."""
    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"minipissa: fan_in_fan_out must be None (detect) or a bool, got {fan_in_fan_out!r:.40}")
    found = find_targets(as_module(model, "apply"), targets, exclude)
    shared = shared_tensors(model, found)
    if shared:
        raise ValueError(
            f"minipissa: {'; '.join(shared[:3])} (tied weights): a PiSSA layer would replace that tensor for this "
            "module only and untie them. `exclude` it, or untie first (e.g. module.weight = "
            "nn.Parameter(module.weight.detach().clone()))"
        )
    plans = []
    for name, module in quantized_base.with_dense_weights(found):  # 4-bit targets: stand-ins, dequantized
        weight = cast(Tensor, module.weight)
        if (weight.is_meta and not sourced) or not weight.is_floating_point():
            raise TypeError(
                f"minipissa: module '{name}' has a {'meta' if weight.is_meta else str(weight.dtype)} weight; "
                "PiSSA needs the real floating-point weight to decompose. Load the weights (and dequantize "
                "quantized layers) before apply(), pass them (a meta model: weights='model.safetensors'), or "
                "`exclude` this module."
            )
        if cfg.quantize and weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"minipissa: module '{name}' has a {weight.dtype} weight; quantize='nf4' stores float32, bfloat16 "
                "or float16 weights in 4 bits. Cast the model (e.g. model.float()) first"
            )
        rank = cfg.rank_for(name)
        flip = is_conv1d(module)
        if fan_in_fan_out is not None and fan_in_fan_out != flip:
            raise ValueError(
                f"minipissa: fan_in_fan_out={fan_in_fan_out} contradicts module '{name}', a {type(module).__name__} "
                f"(weight stored {'(in, out)' if flip else '(out, in)'}); leave fan_in_fan_out=None"
            )
        out_features, in_features = weight_matrix(weight, flip).shape
        if rank > min(out_features, in_features):
            raise ValueError(
                f"minipissa: rank {rank} exceeds min(out, in) = {min(out_features, in_features)} of module "
                f"'{name}' ({out_features}x{in_features}); use a per-module rank, e.g. "
                f"rank={{'*': {rank}, '{name}': {min(out_features, in_features)}}}, or exclude=['{name}']"
            )
        alpha = cfg.alpha_for(name, rank)
        plans.append(
            Plan(
                name,
                module,
                Settings(rank, alpha, cfg.rslora, flip, float(cfg.dropout), cfg.adapter_dtype, cfg.quantize),
            )
        )
    _refuse_unused_patterns(cfg, plans)
    return plans


def _refuse_unused_patterns(cfg: InitConfig, plans: Sequence[Plan]) -> None:
    """A named error for a pattern of a ``rank`` or ``alpha`` mapping that matches no adapted module: it sets
    nothing (a typo?)."""
    for what, spec in (("rank", cfg.rank), ("alpha", cfg.alpha)):
        if not isinstance(spec, dict):
            continue
        unused = [k for k in spec if k != "*" and not any(matches(p.name, k) for p in plans)]
        if unused:
            raise ValueError(
                f"minipissa: `{what}` pattern(s) {unused} match no adapted module (a typo?); the adapted modules "
                f"are {[p.name for p in plans][:8]}"
            )


@dataclass
class Factors:
    """One item of the stream: a plan's initial factors, in the decomposition dtype on the weight's device."""

    plan: Plan
    a0: Tensor  # (r, in)
    b0: Tensor  # (out, r)
    sigma: Tensor  # (r,) the kept singular values; (0,) for LoRA
    # Sharded init writes W_res into the shards as it goes, and fingerprints W and W_res on the owner rank.
    base_print: dict[str, Any] | None = None
    residual_print: dict[str, Any] | None = None
    weight_is_residual: bool = False
    made: Streamed | None = None  # the streamed road's residual and fingerprints, made while W was on the device


def initial_factors(weight: Tensor, plan: Plan, cfg: InitConfig) -> tuple[Tensor, Tensor, Tensor]:
    """A0 (r, in), B0 (out, r) and the kept singular values (r,) of one whole stored weight.

    Randomness (the sketch, LoRA's A) comes from a generator seeded by (seed, module name) alone.
    """
    dtype = decompose.compute_dtype(weight.dtype)
    matrix = weight_matrix(weight.detach(), plan.fan_in_fan_out).to(dtype)
    out_features, in_features = matrix.shape
    if cfg.init == "lora":
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA do: bound = 1 / sqrt(in).
        generator = torch.Generator().manual_seed(decompose.module_seed(cfg.seed, plan.name))
        a0 = (torch.rand(plan.rank, in_features, generator=generator, dtype=dtype) * 2 - 1) / math.sqrt(in_features)
        return a0.to(matrix.device), matrix.new_zeros(out_features, plan.rank), matrix.new_zeros(0)
    omega = None
    if cfg.niter is not None or cfg.iterates:  # the iterations' warm starts take their fresh columns from it too
        columns = decompose.sketch_columns(plan.rank, cfg.oversample, out_features, in_features)
        omega = decompose.sketch(in_features, columns, decompose.module_seed(cfg.seed, plan.name), dtype, matrix.device)
    minor = cfg.components == "minor"

    def cold(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sketch = None if cfg.niter is None else omega
        return decompose.principal_factors(target, plan.rank, plan.scaling, niter=cfg.niter, omega=sketch, minor=minor)

    first = None if cfg.init == "loftq" else cold(matrix)
    iters, dq = cfg.quant_iters, cfg.double_quant
    return qpissa.alternate(matrix, plan.scaling, plan.fan_in_fan_out, iters, first, omega, cold, dq)


def factors(plans: Sequence[Plan], cfg: InitConfig, weights: Weights = IN_PLACE) -> Iterator[Factors]:
    """The initial factors of every plan (whose weights are plain tensors), in no promised order; each weight read
    through ``weights``: in place, or fetched onto a device (fetch.py, told the order first)."""
    stacked = [p for p in plans if cfg.stacks(weights.device(p))]
    single = [p for p in plans if not cfg.stacks(weights.device(p))]
    weights.expect(single + [p for group in batching.groups(stacked, weights).values() for p in group])
    for p, a0, b0, sigma in _one_at_a_time(single, cfg, weights):
        yield Factors(p, a0, b0, sigma)
    for p, a0, b0, sigma in batching.chunks(stacked, cfg, weights):
        yield Factors(p, a0, b0, sigma)


def nonfinite_factors(items: Sequence[Factors]) -> list[str]:
    """The modules whose A0, B0 or singular values hold NaN or inf (one read-back per device)."""
    by_device: dict[torch.device, list[Factors]] = {}
    for item in items:
        by_device.setdefault(item.a0.device, []).append(item)
    bad = []
    for members in by_device.values():
        finite = torch.stack(
            [torch.isfinite(torch.cat([i.a0.flatten(), i.b0.flatten(), i.sigma])).all() for i in members]
        )
        bad += [i.plan.name for i, ok in zip(members, finite.tolist(), strict=True) if not ok]
    return bad


def overflowing_residuals(items: Sequence[Factors], base_prints: Mapping[str, dict[str, Any]]) -> list[str]:
    """The modules whose residual W - s·B0·A0 leaves its weight dtype's range (rounds to inf: float16 weights near
    65504), from each weight's fingerprint (``base_prints``, by module name) and its factors, before any is made.

    |W_res[i, j]| <= |W[i, j]| + s·|B0[i, :]·A0[:, j]| <= ||W||_F + s·||B0||_F·||A0||_F (Cauchy-Schwarz): two norms
    per layer, one read-back per device. Only a layer whose bound reaches the dtype's largest value has its residual
    computed here, to tell for sure (real weights' bounds sit far below float16's largest value, so almost none is).
    """
    by_device: dict[torch.device, list[Factors]] = {}
    for item in items:
        by_device.setdefault(item.a0.device, []).append(item)
    suspects = []
    for members in by_device.values():
        norms = torch.stack([torch.linalg.vector_norm(t) for i in members for t in (i.a0, i.b0)]).tolist()
        for item, a_norm, b_norm in zip(members, norms[0::2], norms[1::2], strict=True):
            bound = math.sqrt(base_prints[item.plan.name]["sumsq"]) + item.plan.scaling * a_norm * b_norm
            if not bound * (1 + 2**-10) < torch.finfo(item.plan.weight.dtype).max:  # 2^-10: float32 rounding, amply
                suspects.append(item)
    with torch.no_grad():
        return [
            i.plan.name for i in suspects
            if not bool(torch.isfinite(
                residual_weight(i.plan.weight, i.a0, i.b0, i.plan.scaling, i.plan.fan_in_fan_out)
            ).all())
        ]  # fmt: skip


def refuse_nonfinite(names: Sequence[str], what: str) -> None:
    """A named error for the modules whose ``what`` are not finite; nothing has been changed yet."""
    if names:
        shown = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(
            f"minipissa: module(s) {shown} have NaN or infinite {what}; nothing was changed. Check the "
            "checkpoint (or exclude these modules)"
        )


def refuse_overflow(named: Sequence[tuple[str, Tensor]], kind: str, where: str) -> None:
    """A named error for tensors (``kind``: "weights" or "biases", by module name) whose fingerprint or initial
    factors (``where``) came out NaN or infinite; nothing has been changed yet. Tensors that hold NaN or inf are
    refused as such; finite ones as too large, with their largest |value|: the fingerprint sums squares in float32
    (float64 for float64 tensors), and the decomposition forms W^T W, products of up to max(m, n) squares, and in
    its randomized form W Ω and its Gram, up to m·n of them."""
    if not named:
        return
    with torch.no_grad():
        refuse_nonfinite([n for n, t in named if not bool(torch.isfinite(t).all())], kind)
        largest = [(n, t, t.detach().abs().max().item() if t.numel() else 0.0) for n, t in named]
    in_factors = where == "initial factors"
    big = [
        (n, m)
        for n, t, m in largest
        if not in_factors or m * m * t.numel() > torch.finfo(decompose.compute_dtype(t.dtype)).max
    ]
    if not big:  # factors not finite for moderate weights: not their size
        refuse_nonfinite([n for n, _, _ in largest], f"{where} (is alpha so small or large that S / s overflows?)")
    shown = ", ".join(f"'{n}' (max |value| = {m:.3g})" for n, m in big[:5]) + (" ..." if len(big) > 5 else "")
    dtype = decompose.compute_dtype(named[0][1].dtype)
    name = dtype_name(dtype)
    wider = " cast the model to float64 first (model.double(): PiSSA then computes in float64)," * (
        dtype != torch.float64
    )
    raise ValueError(
        f"minipissa: module(s) {shown} have finite {kind} too large for PiSSA's {name} arithmetic: sums of their "
        f"squares (in the decomposition's W^T W, and in the fingerprint that identifies the base) pass {name}'s max, "
        f"{torch.finfo(dtype).max:.3g}, and its {where} overflowed; nothing was changed. Rescale them,{wider} or "
        "exclude these modules"
    )


def _one_at_a_time(
    plans: Sequence[Plan], cfg: InitConfig, weights: Weights
) -> Iterator[tuple[Plan, Tensor, Tensor, Tensor]]:
    """Each weight factored on its own, in plan order. On the CPU, where each decomposition runs on one
    thread (thread-count independent factors, see linalg.one_thread), as many weights at once as torch
    has threads and the memory budget allows (each read through ``weights`` here, in order)."""
    workers = torch.get_num_threads() if any(weights.device(p).type == "cpu" for p in plans) else 1
    if workers <= 1 or len(plans) <= 1 or cfg.init == "lora":
        for p in plans:
            yield (p, *_factored(p, weights(p), cfg))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minipissa-init") as pool:
        running: deque[tuple[Plan, int, Future]] = deque()
        in_flight = 0
        for p in plans:
            cost = _workspace(p, cfg)
            while running and (len(running) >= workers or in_flight + cost > cfg.memory_budget):
                done, size, future = running.popleft()
                in_flight -= size
                yield (done, *future.result())
            running.append((p, cost, pool.submit(_factored, p, weights(p), cfg)))
            in_flight += cost
        while running:
            done, _, future = running.popleft()
            yield (done, *future.result())


def _factored(p: Plan, weight: Tensor, cfg: InitConfig) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`initial_factors` of one plan's ``weight``; an error names the module."""
    with batching.naming([p]):
        return initial_factors(weight, p, cfg)


def _workspace(p: Plan, cfg: InitConfig) -> int:
    m, n = p.shape
    columns = None if cfg.niter is None else decompose.sketch_columns(p.rank, cfg.oversample, m, n)
    return batching.workspace_bytes(m, n, columns, decompose.compute_dtype(p.weight.dtype), cfg.iterates)
