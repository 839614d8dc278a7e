"""The one DTensor helper: detect a DTensor, gather one whole, refuse what sharding breaks, write from one rank.

Nothing here imports ``torch.distributed.tensor`` (slow to import): no DTensor exists before it is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import torch.distributed as dist
from torch import Tensor, nn

from .errors import as_module


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a Parameter holding one included)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor, detached: ``DTensor.full_tensor()`` (a collective: every rank of its mesh must call
    this, in the same order), or ``tensor`` itself when it is a plain tensor. Every tensor minipissa reads
    from a live module for saving or converting goes through here."""
    if is_dtensor(tensor):
        tensor = cast(Any, tensor).full_tensor()
    return tensor.detach()


def is_sharded(model: nn.Module | None) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor (FSDP2 / DTensor training)."""
    if model is None:
        return False
    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


def refuse_sharded(model: nn.Module, what: str) -> None:
    """A named error for operations that would write a sharded (DTensor) weight outside FSDP2's storage (and for
    a model that is no nn.Module: this is the first check of the verbs that call it)."""
    if not is_sharded(as_module(model, what)):
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
