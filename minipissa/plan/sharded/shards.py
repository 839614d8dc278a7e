"""Moving one DTensor weight between its shards and one owner rank (1-D meshes, Shard(d) or Replicate()).

Shards follow ``torch.chunk`` (as DTensor and FSDP2 split): the last ranks may hold fewer rows, or none,
so every collective pads to the first shard's length. Every rank of the mesh calls each function.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor


def chunk_sizes(size: int, world: int) -> list[int]:
    """Per-rank lengths of a dimension of ``size`` split like ``torch.chunk`` (DTensor/FSDP2's Shard)."""
    step = -(-size // world)
    return [max(0, min(step, size - r * step)) for r in range(world)]


def layout(name: str, weight: Tensor) -> tuple[Any, int | None]:
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


def gather_to(weight: Tensor, mesh: Any, dim: int | None, owner: int) -> Tensor | None:
    """The whole weight on mesh rank ``owner``, None on the others. Every rank of the mesh calls it."""
    local = cast(Any, weight).to_local()
    me = mesh.get_local_rank()
    if dim is None:
        return local if me == owner else None
    sizes = chunk_sizes(weight.shape[dim], mesh.size())
    padded = pad(local, dim, sizes[0])
    parts = [torch.empty_like(padded) for _ in sizes] if me == owner else None
    dist.gather(padded, parts, group=mesh.get_group(), group_dst=owner)
    if parts is None:
        return None
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim)


def scatter_into(weight: Tensor, full: Tensor | None, mesh: Any, dim: int | None, owner: int) -> None:
    """Write the owner's ``full`` tensor into every rank's shard of ``weight``, in place."""
    local = cast(Any, weight).to_local()
    group = mesh.get_group()
    if dim is None:
        buffer = full if full is not None else torch.empty_like(local)
        dist.broadcast(buffer, group=group, group_src=owner)
        local.copy_(buffer)
        return
    sizes = chunk_sizes(weight.shape[dim], mesh.size())
    shape = list(local.shape)
    shape[dim] = sizes[0]
    received = local.new_empty(shape)
    parts = None
    if full is not None:
        parts = [pad(piece, dim, sizes[0]) for piece in full.split(sizes[0], dim)]
        parts += [torch.zeros_like(received)] * (len(sizes) - len(parts))
    dist.scatter(received, parts, group=group, group_src=owner)
    local.copy_(received.narrow(dim, 0, sizes[mesh.get_local_rank()]))


def pad(tensor: Tensor, dim: int, length: int) -> Tensor:
    """``tensor`` zero-padded along ``dim`` to ``length``, contiguous (collectives need equal shapes)."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim).contiguous()


def broadcast(tensor: Tensor, mesh: Any, owner: int) -> Tensor:
    """``tensor`` (contiguous, same shape on every rank) overwritten with the owner's, in place."""
    dist.broadcast(tensor, group=mesh.get_group(), group_src=owner)
    return tensor
