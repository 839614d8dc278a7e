"""One named adapter of a PiSSA layer that is not the one it holds itself (:class:`Slot`), and the tensor handling
the layer and its slots share: host tensors (A0, B0) in the state dict, casts that move the masters without changing
their dtype.

A PiSSA layer holds one adapter as its own attributes (``A``, ``B``, ``A0``, ``B0``, ``rank``, ``scaling``, ...: a
model with one adapter is exactly what it always was); every other adapter of the layer is a :class:`Slot` in its
``adapters`` ModuleDict (registered once there is a second adapter). nn/adapters.py swaps a slot's contents with the
layer's to switch adapters: no tensor is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.weights import weight_matrix
from .casts import SharedCasts
from .ops import corrected_linear

#: What one adapter consists of, by kind of attribute; the layer holds the same names for the adapter it holds.
PARAMETERS = ("A", "B")  # trainable (r, in), (out, r)
BUFFERS = ("correction_a", "correction_b")  # device, non-persistent: D (k, in), C (out, k), or None
MODULES = ("dropout",)
PLAIN = ("A0", "B0", "rank", "alpha", "rslora", "scaling", "info", "origin", "adapter_name")


class HostState(nn.Module):
    """A module whose state dict also holds host tensors (:meth:`_host`: A0, B0), loaded as buffers would be."""

    def _host(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in self._host().items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        # Copied in place, shapes checked (load_state_dict works on its own copy of the dict, so taking the keys out
        # of it is safe).
        for name, mine in self._host().items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if not isinstance(value, Tensor) or value.shape != mine.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(f"size mismatch for {key}: copying {shape}, the layer holds {tuple(mine.shape)}.")
                continue
            with torch.no_grad():
                mine.copy_(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class AdapterHost(HostState):
    """What a PiSSA layer needs to hold one adapter of several: where the model's active adapter is not on the layer
    (:attr:`absent`), the factors its residual was made from (:meth:`original_factors`), the forward and the fold of
    an adapter whose correction C·D turns that residual into its own. (PiSSALinear's other half: nn/layer.py.)"""

    A: nn.Parameter
    B: nn.Parameter
    A0: Tensor
    B0: Tensor
    weight: Any
    bias: nn.Parameter | None
    scaling: float
    fan_in_fan_out: bool
    shared_casts: SharedCasts | None
    initial_on_device: tuple[Tensor, Tensor] | None
    dropout: nn.Module
    adapter_name: str
    active: str
    order: list[str]
    residual_init: tuple[Tensor, Tensor, float]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling: a layer pickled by minipissa 0.1.0 (one adapter a layer) gets what several adapters need; one
        that 0.2.0 built outside apply()/load(), its order."""
        super().__setstate__(state)
        if "adapter_name" not in state:
            self.adapter_name = self.active = "default"
            self.residual_init = (self.A0, self.B0, self.scaling)
            for name in BUFFERS:
                self.register_buffer(name, None, persistent=False)
        if "order" not in state:
            self.order = [self.adapter_name]

    def exchange(self, slot: Slot) -> None:
        """Swap the adapter this layer holds with ``slot``'s: parameters, buffers, modules and settings change places,
        none copied. Straight through the tables (not ``setattr``, whose checks cost more than the swap): a switch of
        adapter runs this for every layer."""
        for table, keys in (("_parameters", PARAMETERS), ("_buffers", BUFFERS), ("_modules", MODULES)):
            mine, theirs = getattr(self, table), getattr(slot, table)
            for key in keys:
                mine[key], theirs[key] = theirs[key], mine[key]
        mine, theirs = vars(self), vars(slot)
        for key in PLAIN:
            mine[key], theirs[key] = theirs[key], mine[key]

    @property
    def absent(self) -> bool:
        """The model's active adapter is not on this layer, which then computes the original W_res + s0·B0·A0."""
        return self.active != self.adapter_name

    def original_factors(self) -> tuple[Tensor, Tensor, float]:
        """A0 (r0, in), B0 (out, r0) and s0 that W_res was made from (on the device while original() or an absent
        adapter put them there)."""
        a0, b0, s0 = self.residual_init
        a0, b0 = self.initial_on_device or (a0, b0)
        return a0, b0, s0

    def added_delta(self) -> Tensor:
        """What the layer adds to W_res now, (out, in) in A's dtype: s·B·A; where the adapter corrects another
        one's residual, also C·D; where the active adapter is absent, s0·B0·A0 (merge's and unload's fold)."""
        c, d = self._buffers.get("correction_b"), self._buffers.get("correction_a")
        if self.absent:
            a0, b0, s0 = self.original_factors()
            return s0 * (b0.to(self.A.device, self.A.dtype) @ a0.to(self.A.device, self.A.dtype))
        delta = self.scaling * (self.B @ self.A)
        return delta if c is None or d is None else delta + c.to(self.A.dtype) @ d.to(self.A.dtype)

    def _fast_corrected(self, x: Tensor) -> Tensor:
        """The layer's fast path with this adapter's correction C·D of the residual (dense: a 4-bit residual is
        never corrected)."""
        a, b, dropout = self.A, self.B, self.dropout
        xa = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
        casts = None if self.shared_casts is None else self.shared_casts.casts_for(self, x.dtype, a, b)  # type: ignore[arg-type]
        a_c, b_c = casts if casts is not None else (a, b)
        d, c = cast(Tensor, self._buffers["correction_a"]), cast(Tensor, self._buffers["correction_b"])
        weight = weight_matrix(self.weight, self.fan_in_fan_out)
        return corrected_linear(x, xa, weight, self.bias, a_c, b_c, self.scaling, d, c)

    def _host(self) -> dict[str, Tensor]:
        """The host tensors in the state dict: A0, B0, and those W_res was made from where they are another
        adapter's (nn/adapters.py)."""
        a0, b0, _ = self.residual_init
        return {"A0": self.A0, "B0": self.B0} | ({} if a0 is self.A0 else {"residual_A0": a0, "residual_B0": b0})


class Slot(HostState):
    """An adapter a PiSSA layer holds beside its own: A (r, in) and B (out, r) (trainable Parameters, frozen while
    the slot is not active), A0, B0 (host memory, in the state dict as the layer's are), the correction C·D of the
    layer's residual for this adapter (device buffers, not in the state dict: they follow from A0/B0), its settings.
    Filled by nn/adapters.py (:func:`~minipissa.nn.adapters.add`)."""

    A: nn.Parameter
    B: nn.Parameter
    A0: Tensor
    B0: Tensor
    correction_a: Tensor | None
    correction_b: Tensor | None
    factors: tuple[str, str] | None  # the hashes of A0, B0 as made (core/made.py), while not held by the layer
    rank: int
    alpha: float
    rslora: bool
    scaling: float
    info: dict[str, Any]
    origin: Any
    adapter_name: str
    dropout: nn.Module

    def __init__(self) -> None:
        super().__init__()
        for name in BUFFERS:
            self.register_buffer(name, None, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        return super()._apply(device_only(fn, [self.A, self.B, self.A.grad, self.B.grad]), recurse)

    def _host(self) -> dict[str, Tensor]:
        return {"A0": self.A0, "B0": self.B0}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, corrected={self.correction_b is not None}"


def device_only(fn: Callable[[Tensor], Tensor], kept: Iterable[Tensor | None]) -> Callable[[Tensor], Tensor]:
    """``fn`` (what ``Module._apply`` applies to each tensor) for every tensor but ``kept``, which follow its device
    moves only: ``model.half()`` would round the float32 masters A and B (their dtype is set by ``adapter_dtype``)."""
    kept_ids = {id(t) for t in kept if t is not None}

    def apply(t: Tensor) -> Tensor:
        if id(t) not in kept_ids:
            return fn(t)
        target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return t.to(device=target.device)

    return apply
