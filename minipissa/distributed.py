"""PiSSA on sharded models: initialisation of DTensor / FSDP2 weights, one matrix per rank at a time.

When the model fits one device, none of this is needed: call :func:`minipissa.apply` first, then wrap the
model (DDP, or FSDP2 ``fully_shard``); A and B are parameters like any other.

When the weights are already sharded (FSDP2 ``fully_shard``, DTensor parameters on a 1-D mesh),
:func:`minipissa.apply` hands the targets to :func:`init_sharded`: every target weight is gathered to one
owner rank (greedy by cost, so ranks take different matrices and init time falls with the number of
ranks), decomposed there by the same code and per-module seed as in a single process, the factors are
broadcast (small), and the residual is scattered back into the weight's own shards, in place. Peak memory
per rank stays near one full matrix; the factors equal a single-process init bit for bit on the same kind
of device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .decompose import compute_dtype
from .fingerprint import fingerprint
from .layer import PiSSALinear, lora_scaling, residual_weight, weight_matrix

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


def _chunks(size: int, world: int) -> list[int]:
    """Per-rank lengths of a dimension of ``size`` split like ``torch.chunk`` (DTensor/FSDP2's Shard)."""
    step = -(-size // world)
    return [max(0, min(step, size - r * step)) for r in range(world)]


def _layout(name: str, weight: Tensor) -> tuple[Any, int | None]:
    """(1-D device mesh, shard dim or None for Replicate) of a DTensor weight; named error otherwise."""
    from torch.distributed.tensor import Replicate, Shard

    dt = cast(Any, weight)
    mesh, placements = dt.device_mesh, dt.placements
    if mesh.ndim == 1 and isinstance(placements[0], Shard):
        return mesh, placements[0].dim
    if mesh.ndim == 1 and isinstance(placements[0], Replicate):
        return mesh, None
    raise NotImplementedError(
        f"minipissa: module '{name}' has a DTensor weight on a {mesh.ndim}-D mesh with placements "
        f"{tuple(placements)}; sharded init supports one mesh dimension with Shard(d) or Replicate() "
        "(FSDP2 fully_shard over a 1-D mesh). Call minipissa.apply before sharding instead."
    )


def _gather_to(weight: Tensor, mesh: Any, dim: int | None, owner: int) -> Tensor | None:
    """The whole weight on mesh rank ``owner``, None on the others. Every rank of the mesh calls it."""
    local = cast(Any, weight).to_local()
    me = mesh.get_local_rank()
    if dim is None:
        return local if me == owner else None
    sizes = _chunks(weight.shape[dim], mesh.size())
    padded = _pad(local, dim, sizes[0])
    parts = [torch.empty_like(padded) for _ in sizes] if me == owner else None
    dist.gather(padded, parts, group=mesh.get_group(), group_dst=owner)
    if parts is None:
        return None
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim)


def _scatter_into(weight: Tensor, full: Tensor | None, mesh: Any, dim: int | None, owner: int) -> None:
    """Write the owner's ``full`` tensor into every rank's shard of ``weight``, in place."""
    local = cast(Any, weight).to_local()
    group = mesh.get_group()
    if dim is None:
        buffer = full if full is not None else torch.empty_like(local)
        dist.broadcast(buffer, group=group, group_src=owner)
        local.copy_(buffer)
        return
    sizes = _chunks(weight.shape[dim], mesh.size())
    received = _pad(local, dim, sizes[0]).new_empty(0).resize_(_pad(local, dim, sizes[0]).shape)
    parts = None
    if full is not None:
        parts = [_pad(piece, dim, sizes[0]) for piece in full.split(sizes[0], dim)]
        parts += [torch.zeros_like(received)] * (len(sizes) - len(parts))
    dist.scatter(received, parts, group=group, group_src=owner)
    local.copy_(received.narrow(dim, 0, sizes[mesh.get_local_rank()]))


def _pad(tensor: Tensor, dim: int, length: int) -> Tensor:
    """``tensor`` zero-padded along ``dim`` to ``length``, contiguous (collectives need equal shapes)."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim).contiguous()


def _broadcast(tensor: Tensor, mesh: Any, owner: int) -> Tensor:
    dist.broadcast(tensor, group=mesh.get_group(), group_src=owner)
    return tensor


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
    layouts = [_layout(p.name, cast(Tensor, p.module.weight)) for p in plans]
    if len({mesh.get_group() for mesh, _ in layouts}) != 1:
        raise NotImplementedError(
            "minipissa: the target weights are sharded over different process groups; sharded init needs "
            "them all on one mesh (one fully_shard mesh for the whole model)"
        )
    fsdp = _FsdpAdoption(model, plans)  # checks before anything changes
    mesh = layouts[0][0]
    world = mesh.size()
    shapes = [weight_matrix(cast(Tensor, p.module.weight), p.fan_in_fan_out).shape for p in plans]
    owners = assign_owners([float(m * n * min(m, n)) for m, n in shapes], world)
    queues = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    for step in range(max((len(q) for q in queues), default=0)):
        batch = [q[step] for q in queues if step < len(q)]  # at most one matrix per rank
        whole = {i: _gather_to(cast(Tensor, plans[i].module.weight), *layouts[i], owners[i]) for i in batch}
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
                _broadcast(t, mesh, owner)
            box = [info]
            dist.broadcast_object_list(box, group=mesh.get_group(), group_src=owner)
            info = _ordered_info(box[0], sigma)
            _scatter_into(weight, residual, *layouts[i], owner)
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
    info.update(
        weight_norm=weight.double().norm().item(),
        base_fingerprint=fingerprint(weight),
        residual_fingerprint=fingerprint(residual),
    )
    return a0.contiguous(), b0.contiguous(), sigma.contiguous(), residual, info


def _ordered_info(received: dict[str, Any], sigma: Tensor) -> dict[str, Any]:
    """The layer's info with the keys in single-process apply's order (JSON metadata keeps the order)."""
    info = {key: received[key] for key in INFO_OPTIONS}
    info["singular_values"] = sigma.tolist()
    for key in ("weight_norm", "base_fingerprint", "residual_fingerprint"):
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
    fsdp: _FsdpAdoption,
    replace: Any,
) -> None:
    base = plan.module
    weight, bias = cast(nn.Parameter, base.weight), cast(nn.Parameter | None, base.bias)
    residual_fp = info.pop("residual_fingerprint")
    layer = PiSSALinear(
        base,
        a0,
        b0,
        alpha=plan.alpha,
        rslora=rslora,
        dropout=dropout,
        fan_in_fan_out=plan.fan_in_fan_out,
        adapter_dtype=adapter_dtype,
        info=info,
        base_is_residual=True,
    )
    # Keep the very Parameter objects (now holding the residual): FSDP2 all-gathers those.
    layer.weight, layer.bias = weight, bias
    layer.info["residual_fingerprint"] = residual_fp
    replace(model, plan.name, layer)
    fsdp.adopt(base, layer)


class _FsdpAdoption:
    """Keeps FSDP2's bookkeeping right when a module it manages is replaced by a PiSSALinear.

    FSDP2 records, for each parameter, the module it sets the all-gathered tensor on. The weight and bias
    keep their Parameter objects, so only that module reference moves to the new layer. A and B are new:
    they get their own FSDP2 group on the layer (same mesh and policies as the enclosing group), so they
    are sharded, all-gathered and reduce-scattered like any parameter. These are FSDP2 internals
    (torch 2.13); if they change, the checks here fail loudly before anything is modified.
    """

    def __init__(self, model: nn.Module, plans: Sequence[_Plan]) -> None:
        self.found: dict[int, tuple[Any, list[Any]]] = {}
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
        except ImportError:  # pragma: no cover
            return
        targets = {id(p.module): p.name for p in plans}
        for plan in plans:
            if _get_module_fsdp_state(plan.module) is not None:
                raise ValueError(
                    f"minipissa: fully_shard was applied to the target module '{plan.name}' itself; apply it "
                    "to the blocks that contain the targets (e.g. decoder layers) and to the root, then "
                    "minipissa.apply"
                )
        for module in model.modules():
            state = _get_module_fsdp_state(module)
            if state is None:
                continue
            if state._is_root is not None:
                raise RuntimeError(
                    "minipissa: this FSDP2 model has already run a forward pass; call minipissa.apply "
                    "before the first forward (FSDP2 fixes its parameter groups then)"
                )
            for group in state._fsdp_param_groups:
                for param in group.fsdp_params:
                    info = param._module_info
                    if any(id(m) in targets for m in info.shared_modules):
                        raise NotImplementedError("minipissa: a target module is shared (used twice) under FSDP2")
                    if id(info.module) in targets:
                        self.found.setdefault(id(info.module), (group, []))[1].append(param)

    def adopt(self, old: nn.Module, new: PiSSALinear) -> None:
        entry = self.found.get(id(old))
        if entry is None:  # a DTensor weight that FSDP2 does not manage
            return
        from torch.distributed.fsdp import fully_shard

        group, params = entry
        for param in params:
            param._module_info.module = new
        frozen = {p for p in (new.weight, new.bias) if p is not None}
        fully_shard(
            new,
            mesh=group.mesh_info.mesh,
            reshard_after_forward=group.post_forward_mesh_info is not None,
            mp_policy=group.mp_policy,
            offload_policy=group.offload_policy,
            ignored_params=cast(set[nn.Parameter], frozen),
        )
