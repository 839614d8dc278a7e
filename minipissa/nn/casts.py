"""The adapters' float32 masters cast to the activation dtype once per model forward, in one launch.

Each adapted layer needs A and B in the activations' dtype (bf16, say). Cast layer by layer, that is
two kernel launches per adapter per forward and two more in backward: 896 for the 224 adapters of a 7B model,
and on a GPU a launch costs the host more than these small casts cost the device. Instead, a
:class:`SharedCasts` object's forward pre-hook on the model casts every master into one fresh buffer with a
single ``torch._foreach_copy_`` (:class:`CastAll`, differentiable: its backward casts every gradient back in one
launch too), and each layer asks it for its views (:meth:`SharedCasts.casts_for`) during this forward only (a
forward hook takes them back, also on error). A layer called outside that window (gradient-checkpoint
recomputation, a submodule called alone, a dtype other than its weight's) casts for itself, and each copy
carries the storage and version of the masters it was made from, checked at use (wrappers such as FSDP swap
storages in their own hooks; sharded DTensor masters are left to the layers): no layer ever reads a stale copy.
The buffer is new each forward, never written in place, so two forwards before one backward stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..core.dtensor import is_dtensor

MastersKey = tuple[int, int, int, int]
#: The layer modes whose forward takes A and B from the casts: its own adapter, with or without a correction.
CASTING = ("adapter", "corrected")


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


class CastAll(torch.autograd.Function):
    """``masters`` (any number of tensors of one dtype and device) -> views of one new buffer in ``dtype``, in one
    launch; backward: the gradients cast back to the masters' dtype in one launch. A cast no layer used gets no
    gradient (None, as an unused parameter would), not zeros, so that the optimizer skips its master."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *masters: Tensor) -> tuple[Tensor, ...]:
        casts = _views_of_one_buffer([t.shape for t in masters], dtype, masters[0].device)
        torch._foreach_copy_(casts, list(masters))
        ctx.shapes, ctx.master_dtype = [t.shape for t in masters], masters[0].dtype
        ctx.set_materialize_grads(False)
        return tuple(casts)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        given = [(i, g) for i, g in enumerate(grads) if g is not None]
        if not given:
            return (None,) * (1 + len(grads))
        out: list[Tensor | None] = [None] * len(grads)
        pieces = _views_of_one_buffer([ctx.shapes[i] for i, _ in given], ctx.master_dtype, given[0][1].device)
        for (i, _), piece in zip(given, pieces, strict=True):
            out[i] = piece
        torch._foreach_copy_(pieces, [g for _, g in given])
        return (None, *out)


def _views_of_one_buffer(shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    return [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes, strict=True)]


def masters_key(a: Tensor, b: Tensor) -> MastersKey:
    """Storage and version of masters A and B: any in-place update or swap of either changes it."""
    return a.data_ptr(), a._version, b.data_ptr(), b._version


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

    def casts_for(self, layer: Adapter, dtype: torch.dtype, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
        """``layer``'s masters ``a`` (its A) and ``b`` (its B) in ``dtype``, cast in this forward from these very
        tensors; or None."""
        entry = self._copies.get(id(layer))
        if entry is None or entry[0].dtype != dtype or entry[2] != masters_key(a, b):
            return None
        return entry[0], entry[1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._copies.clear()

    def __getstate__(self) -> dict[str, Any]:  # pickling and deepcopy: copies live only inside a forward
        return self.__dict__ | {"_copies": {}}

    def _cast_all(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # the compiler fuses the per-layer casts itself
            return
        # Host time matters here (once per forward for every adapter): each attribute is read once.
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[Adapter, Tensor, Tensor]]] = {}
        for layer in self.layers:
            if layer.mode not in CASTING:
                continue
            a, b, dtype = layer.A, layer.B, layer.weight.dtype
            if a.dtype == b.dtype != dtype and not layer.merged and not (is_dtensor(a) or is_dtensor(b)):
                groups.setdefault((a.device, dtype), []).append((layer, a, b))  # sharded masters cast their own
        for (_, dtype), members in groups.items():
            views = CastAll.apply(dtype, *(t for _, a, b in members for t in (a, b)))
            for i, (layer, a, b) in enumerate(members):
                self._copies[id(layer)] = (views[2 * i], views[2 * i + 1], masters_key(a, b))

    def _release(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self._copies.clear()
