"""Several named adapters on one PiSSA layer: one residual, every adapter exact.

The layer keeps ONE residual, W_res0 = W - s0·B0_0·A0_0, made from its first adapter's initial factors (its
``residual_init``). It holds one adapter as its own attributes (``A``, ``B``, ``A0``, ``B0``, ``rank``, ``scaling``,
``info``...: with one adapter, the layer is what it always was); the others are :class:`~.adapter_slot.Slot` modules
in its ``adapters`` ModuleDict. Switching swaps a slot's contents with the layer's (:func:`swap`): no tensor is
copied, none decomposed.

Adapter j was trained on its own residual W_res_j = W - s_j·B0_j·A0_j. The layer gives it W_res0 + C_j·D_j with

    C_j = [s0·B0_0 | -s_j·B0_j]  (out, k),    D_j = [A0_0 ; A0_j]  (k, in),    k <= r0 + r_j

(blocks of a zero B0 left out: a LoRA's W_res_j is W itself), kept on the device in the residual's dtype: W up to
W_res0's rounding, minus j's own initial part. When j's initial factors and scaling are the layer's own
(:func:`shares_residual`: bit for bit, as two adapters of one base and one init have them), W_res_j is W_res0 bit for
bit and there is no correction: the layer computes exactly what a model with adapter j alone computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.weights import lora_scaling, weight_matrix
from .adapter_slot import Slot
from .layer import PiSSALinear
from .ops import corrected_linear, low_rank_linear

Holder = PiSSALinear | Slot


def slots(layer: PiSSALinear) -> dict[str, Slot]:
    """The layer's other adapters, by name (empty while it has one)."""
    found = layer._modules.get("adapters")
    return {} if found is None else cast(dict[str, Slot], dict(found.named_children()))


def names(layer: PiSSALinear) -> list[str]:
    """The names of the layer's adapters, in the order they came (switching reorders the slots, not this)."""
    have, order = [layer.adapter_name, *slots(layer)], layer.order
    return sorted(have, key=lambda n: order.index(n) if n in order else len(order))


def holder(layer: PiSSALinear, name: str) -> Holder | None:
    """Where adapter ``name``'s tensors are: the layer itself, one of its slots, or None (not on this layer)."""
    if layer.adapter_name == name:
        return layer
    return slots(layer).get(name)


def corrected(holder: Holder) -> bool:
    """Whether this adapter computes with a correction C·D of the layer's residual (not its own)."""
    return holder._buffers.get("correction_b") is not None


def shares_residual(layer: PiSSALinear, a0: Tensor, b0: Tensor, scaling: float) -> bool:
    """Whether initial factors A0 (r, in), B0 (out, r) with ``scaling`` give the layer's residual bit for bit."""
    base_a0, base_b0, base_s = layer.residual_init
    return scaling == base_s and torch.equal(a0.cpu(), base_a0) and torch.equal(b0.cpu(), base_b0)


@torch.no_grad()
def correction(layer: PiSSALinear, a0: Tensor, b0: Tensor, scaling: float) -> tuple[Tensor, Tensor] | None:
    """D (k, in), C (out, k) with W_res0 + C·D = W - s·B0·A0 up to W_res0's rounding, on the residual's device in
    its dtype; None when the residual is this adapter's own (or both initial parts are zero, as two LoRA inits' are)."""
    if shares_residual(layer, a0, b0, scaling):
        return None
    base_a0, base_b0, base_s = layer.residual_init
    blocks = [(base_s * base_b0, base_a0), (-scaling * b0.to(base_b0.dtype), a0.to(base_a0.dtype))]
    kept = [(c, d) for c, d in blocks if bool(c.any())]
    if not kept:
        return None
    dtype = layer.weight.dtype  # dense: the residual's (a 4-bit residual takes no correction: plan/named.py)
    c = torch.cat([c for c, _ in kept], dim=1).to(layer.A.device, dtype)
    d = torch.cat([d for _, d in kept], dim=0).to(layer.A.device, dtype)
    return d, c


def add(
    layer: PiSSALinear,
    name: str,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    alpha: float,
    rslora: bool,
    dropout: float,
    info: dict[str, Any],
    factors: tuple[str, str] | None,
    origin: Any,
) -> Slot:
    """Put adapter ``name`` on the layer beside its own: ``tensors`` = A (r, in), B (out, r) in the adapter dtype,
    A0, B0 in the decomposition dtype; ``factors``: the hashes of A0, B0 (core/made.py). Frozen until active."""
    a, b, a0, b0 = tensors
    slot = Slot()
    slot.A = nn.Parameter(a.detach().to(layer.A.device, copy=True), requires_grad=False)
    slot.B = nn.Parameter(b.detach().to(layer.A.device, copy=True), requires_grad=False)
    scaling = lora_scaling(alpha, a0.shape[0], rslora)
    if shares_residual(layer, a0, b0, scaling):  # one host copy of the initial factors for all who share them
        a0, b0 = layer.residual_init[0], layer.residual_init[1]
    else:
        a0, b0 = a0.detach().to("cpu", copy=True), b0.detach().to("cpu", copy=True)
    slot.correction_a, slot.correction_b = correction(layer, a0, b0, scaling) or (None, None)
    slot.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    slot.A0, slot.B0, slot.rank, slot.scaling = a0, b0, a0.shape[0], scaling
    slot.alpha, slot.rslora, slot.info, slot.origin = float(alpha), rslora, dict(info), origin
    slot.adapter_name, slot.factors = name, factors
    if "adapters" not in layer._modules:
        layer.adapters = nn.ModuleDict()
    cast(nn.ModuleDict, layer.adapters)[name] = slot
    layer.order = [*names(layer)[:-1], name]
    return slot


def swap(layer: PiSSALinear, name: str) -> None:
    """Make slot ``name`` the layer's own adapter and the layer's own a slot: attributes exchanged, none copied."""
    registry = cast(nn.ModuleDict, layer.adapters)
    slot = cast(Slot, registry[name])
    layer.exchange(slot)
    if layer.made is not None:  # the residual's record stays; the factors' hashes go with their adapter
        layer.made.factors, slot.factors = cast(tuple[str, str], slot.factors), layer.made.factors
    del registry[name]
    registry[slot.adapter_name] = slot


def settle(layer: PiSSALinear, active: str) -> None:
    """Make ``active`` the layer's adapter if it has it (its A and B alone require grad); else the layer computes
    the original weight (mode "absent"). Every other adapter of the layer is frozen."""
    layer.active = active
    if layer.adapter_name != active and active in slots(layer):
        swap(layer, active)
    present = layer.adapter_name == active
    layer.mode = ("corrected" if corrected(layer) else "adapter") if present else "absent"
    if not layer.merged:  # merged, A and B stay frozen until unmerge() (layer.py)
        layer.A.requires_grad_(present)
        layer.B.requires_grad_(present)
    for slot in slots(layer).values():
        slot.A.requires_grad_(False)
        slot.B.requires_grad_(False)
    a0, b0, _ = layer.residual_init
    if present or layer.A.device == a0.device:
        layer.initial_on_device = None
    elif layer.initial_on_device is None:  # absent: W_res + s0·B0·A0 on the device (rank-sized, copied once)
        layer.initial_on_device = (a0.to(layer.A.device), b0.to(layer.A.device))


def remove(layer: PiSSALinear, name: str) -> None:
    """Take adapter ``name`` off the layer (which keeps its residual and the factors it was made from). The layer's
    own adapter is replaced by one of its slots (the caller makes sure it has one)."""
    if layer.adapter_name == name:
        swap(layer, next(iter(slots(layer))))
    registry = cast(nn.ModuleDict, layer.adapters)
    del registry[name]
    layer.order = [n for n in layer.order if n != name]
    if not len(registry):
        del layer.adapters


def per_example(layer: PiSSALinear, chosen: Sequence[str | None]) -> Callable[[Tensor], Tensor]:
    """The layer's forward for a batch whose example i (batch dim 0) runs with adapter ``chosen[i]`` (None, or an
    adapter not on this layer: the original weight), each group of examples through the ops its adapter's own
    forward runs (so an example alone in its group gets its output bit for bit)."""
    device = layer.A.device
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(chosen):
        groups.setdefault(name if name is not None and holder(layer, name) is not None else None, []).append(i)
    a0, b0, s0 = layer.residual_init
    a0, b0 = a0.to(device), b0.to(device)

    def one(name: str | None) -> Callable[[Tensor], Tensor]:
        if name is None:
            return lambda x: low_rank_linear(
                x, weight_matrix(layer.residual(x.dtype), layer.fan_in_fan_out), layer.bias, a0, b0, s0
            )
        return lambda x: adapter_output(layer, cast(Holder, holder(layer, name)), x)

    steps = [(one(name), torch.tensor(rows, device=device)) for name, rows in groups.items()]

    def forward(x: Tensor) -> Tensor:
        if x.shape[0] != len(chosen):
            raise ValueError(
                f"minipissa.per_example: {len(chosen)} adapters were given, one per example, but a PiSSA layer got a "
                f"batch of {x.shape[0]} (input {tuple(x.shape)}; the batch dimension must be the first)"
            )
        if len(steps) == 1:
            return steps[0][0](x)
        out: Tensor | None = None
        for run, rows in steps:
            y = run(x.index_select(0, rows))
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out.index_copy_(0, rows, y)
        return cast(Tensor, out)

    return forward


def adapter_output(layer: PiSSALinear, holder: Holder, x: Tensor) -> Tensor:
    """The layer's output for x (..., in) with the adapter in ``holder`` (the layer's own or a slot), by the ops of
    the layer's fast path (ops.py), A and B cast to x's dtype as the model's shared casts would."""
    dropout = holder.dropout
    xa = None if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
    if not corrected(holder):
        return layer.weight_kind.linear(
            x, xa, layer.weight, layer.bias, holder.A, holder.B, holder.scaling, layer.fan_in_fan_out
        )
    d, c = cast(Tensor, holder.correction_a), cast(Tensor, holder.correction_b)
    weight = weight_matrix(cast(Tensor, layer.weight), layer.fan_in_fan_out)
    return corrected_linear(x, xa, weight, layer.bias, holder.A, holder.B, holder.scaling, d, c)
