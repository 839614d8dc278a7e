"""PiSSA on sharded models: initialisation of DTensor / FSDP2 weights, one matrix per rank at a time.

When the model fits one device, none of this is needed: call :func:`minipissa.apply` first, then wrap the
model (DDP, or FSDP2 ``fully_shard``); A and B are parameters like any other.

When the weights are already sharded (FSDP2 ``fully_shard``, DTensor parameters on a 1-D mesh),
:func:`minipissa.apply` hands the targets to :func:`init_sharded`: every target weight is gathered to one
owner rank (greedy by cost, so ranks take different matrices and init time falls with the number of
ranks), decomposed there by the same code and per-module seed as in a single process, the factors are
broadcast (small), and the residual is scattered back into the weight's own shards, in place. A rank holds
at most one whole matrix at a time, in a few copies (its gathered pieces, the decomposition's float32
copy, the residual), whatever the model's size. The factors equal a single-process init bit for bit where
that init decomposes one matrix at a time (the CPU); apply() on a GPU stacks same-shape weights, which
changes them by rounding only.

Saving a sharded model (:func:`write_once`): every rank calls ``save``/``convert_to_lora``/``save_residual``
(gathering is collective), rank 0 writes, the others wait and then may read the file.

Not supported on sharded weights: 2-D meshes (HSDP, FSDP + TP) for sharded init (apply before sharding
instead), merge/unmerge/unload, and ``load`` onto a sharded model (load, then shard).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .decompose import compute_dtype
from .fingerprint import describe, fingerprint
from .fsdp_adopt import FsdpAdoption
from .layer import lora_scaling, residual_weight, weight_matrix
from .shards import broadcast, gather_to, layout, scatter_into

if TYPE_CHECKING:
    from .model import _Plan

#: apply() options recorded in each layer's info, in apply()'s order.
INFO_OPTIONS = ("init", "niter", "oversample", "seed", "components")


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor. Never imports DTensor (0.5 s): no DTensor exists before it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def any_sharded(tensors: Iterable[object]) -> bool:
    """Whether any of ``tensors`` is a DTensor (the model is sharded)."""
    return any(is_dtensor(t) for t in tensors)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: ``DTensor.full_tensor()`` (a collective: every rank of its mesh must call
    this, in the same order), or ``tensor`` itself when it is a plain tensor."""
    return cast(Tensor, cast(Any, tensor).full_tensor()) if is_dtensor(tensor) else tensor


def is_sharded(model: nn.Module | None) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor (FSDP2 / DTensor training)."""
    if model is None:
        return False
    return any_sharded(model.parameters()) or any_sharded(model.buffers())


def refuse_sharded(model: nn.Module, what: str) -> None:
    """A named error for operations that would write a sharded (DTensor) weight outside FSDP2's storage."""
    if not is_sharded(model):
        return
    instead = (
        "load onto the whole model first, then shard it"
        if what == "load"
        else f"save the adapter (minipissa.save, on every rank), load it onto the whole model in one process and "
        f"{what} there"
    )
    raise NotImplementedError(
        f"minipissa.{what}: the model is sharded (DTensor weights) and FSDP2 keeps its own storage of the "
        f"shards, which {what} would not reach; {instead}"
    )


def write_once(model: nn.Module | None, write: Callable[[], None]) -> None:
    """Run ``write`` (which writes files from tensors already gathered) on one rank of a sharded run.

    A sharded model (DTensors) is gathered by collectives, so every rank has called the function that
    calls this: global rank 0 writes, the others wait for it, and all raise if it failed. An unsharded
    model (one process, or DDP, where one often saves from rank 0 alone) is written by whoever calls.
    """
    if not (is_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        write()
        return
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - reported to every rank below, then re-raised
            failure = e
    # Doubles as the barrier: no rank goes on before rank 0 has written (or failed).
    box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise RuntimeError(f"minipissa: rank 0 failed to write the file: {box[0]}")


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


@torch.no_grad()
def init_sharded(
    model: nn.Module,
    plans: Sequence[_Plan],
    factor_options: dict[str, Any],
    *,
    rslora: bool,
    dropout: float,
    adapter_dtype: torch.dtype | None,
) -> list[_Plan]:
    """Replace each planned module with a DTensor weight by a PiSSALinear, its factors computed on one owner
    rank; return the plans with plain weights, for apply() to handle as in one process.

    Every rank of the mesh must call this with the same plans (it is a sequence of collectives). The
    residual is written into the weight's existing shards, so the Parameter objects (and FSDP2's
    bookkeeping of them) stay; A and B become FSDP2 parameters of their own small group.
    ``factor_options`` are :func:`minipissa.model.initial_factors`'s keywords (init, niter, seed, ...).
    """
    from .model import _replace, initial_factors  # model.py imports this module, so import it late

    plain = [p for p in plans if not is_dtensor(p.module.weight)]
    plans = [p for p in plans if is_dtensor(p.module.weight)]
    if not plans:
        return plain
    layouts = [layout(p.name, cast(Tensor, p.module.weight)) for p in plans]
    if len({mesh.get_group() for mesh, _ in layouts}) != 1:
        raise NotImplementedError(
            "minipissa: the target weights are sharded over different process groups; sharded init needs "
            "them all on one mesh (one fully_shard mesh for the whole model)"
        )
    fsdp = FsdpAdoption(model, plans)  # checks before anything changes
    mesh = layouts[0][0]
    world = mesh.size()
    shapes = [weight_matrix(cast(Tensor, p.module.weight), p.fan_in_fan_out).shape for p in plans]
    owners = assign_owners([float(m * n * min(m, n)) for m, n in shapes], world)
    queues = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    for step in range(max((len(q) for q in queues), default=0)):
        batch = [q[step] for q in queues if step < len(q)]  # at most one matrix per rank
        whole = {i: gather_to(cast(Tensor, plans[i].module.weight), *layouts[i], owners[i]) for i in batch}
        # Each rank decomposes the one matrix it owns in this round: this is where ranks run in parallel.
        mine = {
            i: _decompose(plans[i], w, rslora, factor_options, initial_factors)
            for i, w in whole.items()
            if w is not None
        }
        del whole
        for i in batch:
            plan, owner = plans[i], owners[i]
            weight = cast(Tensor, plan.module.weight)
            out_f, in_f = shapes[i]
            dtype, device = compute_dtype(weight.dtype), cast(Any, weight).to_local().device
            sigma_len = 0 if factor_options.get("init") == "lora" else plan.rank
            a0, b0, sigma, residual, info = (
                mine.pop(i)
                if i in mine
                else (
                    torch.empty(plan.rank, in_f, dtype=dtype, device=device),
                    torch.empty(out_f, plan.rank, dtype=dtype, device=device),
                    torch.empty(sigma_len, dtype=dtype, device=device),
                    None,
                    None,
                )
            )
            for t in (a0, b0, sigma):
                broadcast(t, mesh, owner)
            box = [info]
            dist.broadcast_object_list(box, group=mesh.get_group(), group_src=owner)
            info = _ordered_info(box[0], sigma)
            scatter_into(weight, residual, *layouts[i], owner)
            del residual
            _install(model, plan, a0, b0, info, rslora, dropout, adapter_dtype, fsdp, _replace)
    return plain


def _decompose(plan: _Plan, weight: Tensor, rslora: bool, options: dict[str, Any], initial_factors: Any) -> tuple:
    """Factors, residual and info of one whole weight, exactly as a single-process apply computes them."""
    scaling = lora_scaling(plan.alpha, plan.rank, rslora)
    a0, b0, sigma = initial_factors(
        weight, plan.name, plan.rank, scaling, fan_in_fan_out=plan.fan_in_fan_out, **options
    )
    residual = residual_weight(weight, a0, b0, scaling, plan.fan_in_fan_out)
    info = {key: options.get(key) for key in INFO_OPTIONS}
    info.update(describe(sigma, fingerprint(weight)))  # the residual's: at save, as after apply()
    return a0.contiguous(), b0.contiguous(), sigma.contiguous(), residual, info


def _ordered_info(received: dict[str, Any], sigma: Tensor) -> dict[str, Any]:
    """The layer's info with the keys in single-process apply's order (JSON metadata keeps the order)."""
    info = {key: received[key] for key in INFO_OPTIONS}
    info["singular_values"] = sigma.tolist()
    for key in ("weight_norm", "base_fingerprint"):
        info[key] = received[key]
    return info


def _install(
    model: nn.Module,
    plan: _Plan,
    a0: Tensor,
    b0: Tensor,
    info: dict[str, Any],
    rslora: bool,
    dropout: float,
    adapter_dtype: torch.dtype | None,
    fsdp: FsdpAdoption,
    replace: Any,
) -> None:
    base = plan.module
    weight, bias = cast(nn.Parameter, base.weight), cast(nn.Parameter | None, base.bias)
    layer = plan.layer(a0, b0, info, rslora=rslora, dropout=dropout, adapter_dtype=adapter_dtype, base_is_residual=True)
    # Keep the very Parameter objects (now holding the residual): FSDP2 all-gathers those.
    layer.weight, layer.bias = weight, bias
    replace(model, plan.name, layer)
    fsdp.adopt(base, layer)
