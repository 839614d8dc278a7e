"""Sharded init: initial factors of DTensor / FSDP2 weights, one whole matrix per rank at a time.

When the model fits one device, none of this is needed: call :func:`minipissa.apply` first, then wrap the
model (DDP, or FSDP2 ``fully_shard``); A and B are parameters like any other.

When the weights are already sharded (FSDP2 ``fully_shard``, DTensor parameters on a 1-D mesh), the stream
of :func:`sharded_factors` replaces the per-matrix road of :mod:`minipissa.plan.factors` for them: every target
weight is gathered to one owner rank (greedy by cost, so ranks take different matrices and init time falls with the
number of ranks), factored there by the same :func:`~minipissa.plan.factors.initial_factors` and per-module seed as
in a single process, the factors are broadcast (small), and the residual is scattered back into the
weight's own shards, in place. A rank holds at most one whole matrix at a time, in a few copies (its
gathered pieces, the decomposition's float32 copy, the residual), whatever the model's size. The factors
equal a single-process init's bit for bit where that init decomposes one matrix at a time (the CPU).

Not supported on sharded weights: 2-D meshes (HSDP, FSDP + TP) for sharded init (apply before sharding
instead), merge/unmerge/unload, and ``load`` onto a sharded model (load, then shard).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ...core.decompose import compute_dtype
from ...core.fingerprint import fingerprint
from ...core.weights import residual_weight
from ..config import InitConfig
from ..factors import Factors, initial_factors, nonfinite_factors, refuse_nonfinite, refuse_overflow
from ..tree import Plan
from .shards import broadcast, gather_to, layout, scatter_into


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: largest cost first, to the least-loaded rank (ties: lowest rank).

    Deterministic in ``costs`` alone, so every rank computes the same assignment without talking.
    """
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += costs[i]
    return owners


def check_layouts(plans: Sequence[Plan]) -> None:
    """A named error unless all ``plans``' DTensor weights live on one 1-D mesh, Shard(d) or Replicate()."""
    layouts = [layout(p.name, p.weight) for p in plans]
    if len({mesh.get_group() for mesh, _ in layouts}) > 1:
        raise NotImplementedError(
            "minipissa: the target weights are sharded over different process groups; sharded init needs "
            "them all on one mesh (one fully_shard mesh for the whole model)"
        )


@torch.no_grad()
def check_finite_shards(plans: Sequence[Plan]) -> None:
    """A named error, on every rank, if any of ``plans``' sharded weights holds NaN or inf (one all-reduce)."""
    if not plans:
        return
    local = [cast(Any, p.weight).to_local() for p in plans]
    bad = torch.stack([~torch.isfinite(t).all() if t.numel() else t.new_zeros((), dtype=torch.bool) for t in local])
    bad = bad.to(device=local[0].device, dtype=torch.int32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=layout(plans[0].name, plans[0].weight)[0].get_group())
    refuse_nonfinite([p.name for p, flag in zip(plans, bad.tolist(), strict=True) if flag], "weights")


@torch.no_grad()
def sharded_factors(plans: Sequence[Plan], cfg: InitConfig) -> Iterator[Factors]:
    """The factors of every plan (DTensor weights on one 1-D mesh, see :func:`check_layouts`), each with its residual
    already written into the weight's shards. Every rank of the mesh iterates this with the same plans, in
    the same order (it is a sequence of collectives)."""
    if not plans:
        return
    layouts = [layout(p.name, p.weight) for p in plans]
    mesh = layouts[0][0]
    owners = assign_owners([float(m * n * min(m, n)) for m, n in (p.shape for p in plans)], mesh.size())
    queues = [[i for i, o in enumerate(owners) if o == r] for r in range(mesh.size())]
    for step in range(max(len(q) for q in queues)):
        batch = [q[step] for q in queues if step < len(q)]  # at most one matrix per rank
        whole = {i: gather_to(plans[i].weight, *layouts[i], owners[i]) for i in batch}
        # Each rank factors the one matrix it owns in this round: this is where ranks run in parallel.
        mine = {i: _factor(plans[i], w, cfg) for i, w in whole.items() if w is not None}
        del whole
        for i in batch:
            plan, owned = plans[i], mine.pop(i, None)
            # The fingerprints, or the owner's error, first: every rank raises it instead of waiting forever.
            box: list[Any] = [owned if isinstance(owned, str) else owned and owned.prints]
            dist.broadcast_object_list(box, group=mesh.get_group(), group_src=owners[i])
            if isinstance(box[0], str):
                raise RuntimeError(box[0])
            a0, b0, sigma, residual = owned[:4] if isinstance(owned, _Owned) else _receiving(plan, cfg)
            for t in (a0, b0, sigma):
                broadcast(t, mesh, owners[i])
            scatter_into(plan.weight, residual, *layouts[i], owners[i])
            del residual, owned
            base_print, residual_print = box[0]
            yield Factors(plan, a0, b0, sigma, base_print, residual_print, weight_is_residual=True)


class _Owned(NamedTuple):
    """What the owner rank computes of one whole weight."""

    a0: Tensor
    b0: Tensor
    sigma: Tensor
    residual: Tensor
    prints: tuple[dict[str, Any], dict[str, Any]]  # of W and of the residual


def _factor(plan: Plan, weight: Tensor, cfg: InitConfig) -> _Owned | str:
    """Factors, residual and fingerprints of one whole weight, exactly as a single-process apply computes them;
    or the error, named, for every rank to raise."""
    try:
        a0, b0, sigma = initial_factors(weight, plan, cfg)
        if nonfinite_factors([Factors(plan, a0, b0, sigma)]):  # refused as apply() refuses them in one process
            refuse_overflow([(plan.name, weight)], "weights", "initial factors")
        residual = residual_weight(weight, a0, b0, plan.scaling, plan.fan_in_fan_out)
    except Exception as e:  # noqa: BLE001 - every rank raises it (see sharded_factors)
        return f"minipissa: decomposing module '{plan.name}' failed on its owner rank: {type(e).__name__}: {e}"
    prints = (fingerprint(weight), fingerprint(residual))
    return _Owned(a0.contiguous(), b0.contiguous(), sigma.contiguous(), residual, prints)


def _receiving(plan: Plan, cfg: InitConfig) -> tuple[Tensor, Tensor, Tensor, None]:
    """Buffers for the factors another rank computes and broadcasts."""
    out_features, in_features = plan.shape
    dtype, device = compute_dtype(plan.weight.dtype), cast(Any, plan.weight).to_local().device
    sigma_len = 0 if cfg.init == "lora" else plan.rank
    return (
        torch.empty(plan.rank, in_features, dtype=dtype, device=device),
        torch.empty(out_features, plan.rank, dtype=dtype, device=device),
        torch.empty(sigma_len, dtype=dtype, device=device),
        None,
    )
