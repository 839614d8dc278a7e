"""The adapters' float32 masters cast to the activation dtype once per model forward, in one launch.

Each adapted layer needs A and B in the activations' dtype (bf16, say). Cast layer by layer, that is
two kernel launches per adapter per forward: 448 for the 224 adapters of a 7B model, and on a GPU a
launch costs the host more than these small casts cost the device. Instead, a :class:`SharedCasts`
object's forward pre-hook on the model casts every master into one fresh buffer with a single
``torch._foreach_copy_``, and each layer asks it for its views (:meth:`SharedCasts.casts_for`) during
this forward only (a forward hook takes them back, also on error). A layer called outside that window
(gradient-checkpoint recomputation, a submodule called alone, a dtype other than its weight's) casts
for itself, and each copy carries the storage and version of the masters it was made from, checked at
use (wrappers such as FSDP swap storages in their own hooks; sharded DTensor masters are left to the
layers): no layer ever reads a stale copy. The buffer is new each forward, never written in place, so
two forwards before one backward stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .sharded.dtensor import is_dtensor

MastersKey = tuple[int, int, int, int]


class _Typed(Protocol):
    @property
    def dtype(self) -> torch.dtype: ...


class Adapter(Protocol):
    """What the casts need of a layer (PiSSALinear)."""

    mode: str
    shared_casts: SharedCasts | None

    @property
    def A(self) -> Tensor: ...  # noqa: N802 - the layer's names

    @property
    def B(self) -> Tensor: ...  # noqa: N802

    @property
    def weight(self) -> Tensor | _Typed: ...  # a tensor, or an NF4Weight: its dtype is the activations' guess

    @property
    def merged(self) -> bool: ...

    def masters_key(self) -> MastersKey: ...


def install(model: nn.Module, layers: Sequence[Adapter]) -> None:
    """Give ``model``'s ``layers`` one :class:`SharedCasts`, hooked on ``model`` (in place of any they had)."""
    remove(layers)
    shared = SharedCasts(model, layers)
    for layer in layers:
        layer.shared_casts = shared


def remove(layers: Sequence[Adapter]) -> None:
    """Unhook the :class:`SharedCasts` of ``layers``: they cast for themselves again."""
    for layer in layers:
        if layer.shared_casts is not None:
            layer.shared_casts.remove()
            layer.shared_casts = None


class SharedCasts:
    """The casts of one model's adapters, made in its forward pre-hook and released after its forward."""

    def __init__(self, model: nn.Module, layers: Sequence[Adapter]) -> None:
        self.layers = list(layers)
        self._copies: dict[int, tuple[Tensor, Tensor, MastersKey]] = {}
        self._handles: tuple[RemovableHandle, ...] = (
            model.register_forward_pre_hook(self._cast_all),
            model.register_forward_hook(self._release, always_call=True),
        )

    def casts_for(self, layer: Adapter, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """A and B of ``layer`` in ``dtype``, cast in this forward from the masters it holds now; or None."""
        entry = self._copies.get(id(layer))
        if entry is None or entry[0].dtype != dtype or entry[2] != layer.masters_key():
            return None
        return entry[0], entry[1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._copies.clear()

    def __getstate__(self) -> dict[str, Any]:  # pickling and deepcopy: copies live only inside a forward
        return self.__dict__ | {"_copies": {}}

    @torch.no_grad()
    def _cast_all(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # the compiler fuses the per-layer casts itself
            return
        groups: dict[tuple[torch.device, torch.dtype], list[Adapter]] = {}
        for layer in self.layers:
            dtype = layer.weight.dtype
            plain = not (is_dtensor(layer.A) or is_dtensor(layer.B))  # sharded masters: the layer casts its own
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
                self._copies[id(layer)] = (views[2 * i], views[2 * i + 1], layer.masters_key())

    def _release(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self._copies.clear()
