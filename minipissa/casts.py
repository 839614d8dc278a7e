"""The adapters' float32 masters cast to the activation dtype once per model forward, in one launch.

Each adapted layer needs A and B in the activations' dtype (bf16, say). Cast layer by layer, that is
two kernel launches per adapter per forward: 448 for the 224 adapters of a 7B model, and on a GPU a
launch costs the host more than these small casts cost the device. Instead, a forward pre-hook on
the model casts every master into one fresh buffer with a single ``torch._foreach_copy_`` and hands
each layer its views for this forward only (a forward hook takes them back, also on error). A layer
called outside that window (gradient-checkpoint recomputation, a submodule called alone, a dtype
other than its weight's) casts for itself, and each copy carries the storage and version of the
masters it was made from, checked at use (wrappers such as FSDP swap storages in their own hooks;
sharded DTensor masters are left to the layers): no layer ever reads a stale copy. The buffer is
new each forward, never written in place, so two forwards before one backward stay valid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layer import PiSSALinear

_HOOKS = "_minipissa_cast_hooks"


def install(model: nn.Module) -> None:
    """Register the hooks on ``model``, for the PiSSA layers it holds now (again: refresh them)."""
    remove(model)
    layers = [m for m in model.modules() if isinstance(m, PiSSALinear)]
    model.__dict__[_HOOKS] = (
        model.register_forward_pre_hook(lambda module, args: _cast_all(layers)),
        model.register_forward_hook(lambda module, args, output: _release_all(layers), always_call=True),
    )


def remove(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS, ()):
        handle.remove()


@torch.no_grad()
def _cast_all(layers: list[PiSSALinear]) -> None:
    if torch.compiler.is_compiling():  # the compiler fuses the per-layer casts itself
        return
    groups: dict[tuple[torch.device, torch.dtype], list[PiSSALinear]] = {}
    for layer in layers:
        dtype = layer.weight.dtype
        plain = type(layer.A.data) is torch.Tensor and type(layer.B.data) is torch.Tensor  # not DTensor shards
        same = layer.A.dtype == layer.B.dtype != dtype
        if plain and same and layer.mode == "adapter" and not layer.merged:
            groups.setdefault((layer.A.device, dtype), []).append(layer)
    for (device, dtype), members in groups.items():
        masters: list[Tensor] = [t for layer in members for t in (layer.A, layer.B)]
        sizes = [t.numel() for t in masters]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        views = [piece.view(t.shape) for piece, t in zip(flat.split(sizes), masters, strict=True)]
        torch._foreach_copy_(views, masters)
        for i, layer in enumerate(members):
            layer.__dict__["_cast"] = (views[2 * i], views[2 * i + 1], layer.masters_key())


def _release_all(layers: list[PiSSALinear]) -> None:
    if torch.compiler.is_compiling():
        return
    for layer in layers:
        layer.__dict__.pop("_cast", None)
