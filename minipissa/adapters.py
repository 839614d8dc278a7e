"""Several named adapters on one model: list them, switch between them, delete one, run a batch whose examples use
different ones. Adding one is ``apply(..., name=...)``, ``load(..., name=...)`` or ``load_lora``.

Each adapter computes exactly the model it was trained as, whatever else is loaded (nn/adapters.py): the layers
keep one residual, that of their first adapter; an adapter of the same initialisation uses it as its own (outputs
bit-identical to a model with that adapter alone), any other adapter adds a thin correction C·D to it (W up to the
residual's rounding, minus its own initial part). Switching swaps Parameters: no copy, no decomposition.

Refused by name, the model unchanged: an adapter made for another base weight (fingerprints); on a 4-bit (QPiSSA)
residual, any adapter of another initialisation (its residual's quantization error is another everywhere, and no
low-rank term gives it back) and any dense one; modules trained in full or trained biases beside a second adapter
(a model holds one set of them); switching or adding while merged, inside original()/disabled()/per_example(),
under DistributedDataParallel or FSDP2 (switch before wrapping).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .core.dtensor import refuse_sharded
from .core.errors import StateError
from .nn import adapters as per_layer
from .plan import named, trained
from .plan.config import RECORDED
from .plan.tree import adapted_layers, unwrap


def adapters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every adapter of the model by name, in the order they came: ``modules`` (the modules it adapts), ``active``,
    ``exact`` (True where it computes on its own residual, bit for bit as alone; False: through a correction of
    another adapter's residual, see :mod:`minipissa.adapters`) and its settings (``rank``, ``alpha``, ``rslora``,
    ``dropout`` and the init options), each the value all its modules share, or ``"per-module"``."""
    model = unwrap(model, "adapters")
    layers = adapted_layers(model, "adapters")
    current = named.active(model)
    out: dict[str, dict[str, Any]] = {}
    for adapter in named.adapter_names(model):
        found = [(n, h) for n, layer in layers if (h := per_layer.holder(layer, adapter)) is not None]
        values: dict[str, Any] = {"modules": [n for n, _ in found], "active": adapter == current}
        values["exact"] = not any(per_layer.corrected(h) for _, h in found)
        rows = [
            {"rank": h.rank, "alpha": h.alpha, "rslora": h.rslora, "dropout": _dropout(h.dropout)}
            | dict(zip(RECORDED, named.init_options(h.info), strict=True))
            for _, h in found
        ]
        for key in rows[0]:
            seen = {repr(r[key]) for r in rows}
            values[key] = rows[0][key] if len(seen) == 1 else "per-module"
        out[adapter] = values
    return out


def _dropout(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def active_adapter(model: nn.Module) -> str:
    """The name of the model's active adapter."""
    model = unwrap(model, "active_adapter")
    adapted_layers(model, "active_adapter")
    return str(named.active(model))


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the one the model computes and trains: on each layer that has it its A and B require
    grad (those of every other adapter do not; an optimizer over another adapter then steps nothing), a layer that
    has not got it computes the original weight. No tensor is copied. Refused while merged, inside original(),
    disabled() or per_example(), and under DistributedDataParallel (which keeps the parameters that required grad
    when it was built: switch before wrapping)."""
    outer, model = model, unwrap(model, "set_adapter", adds_parameters=True)
    layers = adapted_layers(model, "set_adapter")
    name = named.known(layers, name, "set_adapter")
    if name != named.active(layers):
        named.refuse_busy(layers, "set_adapter")
    named.settle(layers, name)
    return outer


@contextlib.contextmanager
def adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """``with minipissa.adapter(model, "math"):`` the model computes (and trains) adapter "math"; the adapter
    active before is active again after the block."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Take adapter ``name`` off the model: its A, B, A0, B0 and correction are freed. The layers keep their residual
    and the initial factors it was made from (the base of the other adapters and of ``original()``): nothing is
    rounded again, and every other adapter computes bit for bit what it computed before. The active adapter, and
    the only adapter of a layer, cannot be deleted (set another active; ``unload`` removes PiSSA itself)."""
    outer, model = model, unwrap(model, "delete_adapter")
    refuse_sharded(model, "delete_adapter")
    layers = adapted_layers(model, "delete_adapter")
    name = named.known(model, name, "delete_adapter")
    if name == named.active(model):
        raise StateError(
            f"minipissa.delete_adapter: '{name}' is the active adapter; minipissa.set_adapter(model, other) first"
        )
    holding = [(n, layer) for n, layer in layers if per_layer.holder(layer, name) is not None]
    named.refuse_busy(holding, "delete_adapter")
    alone = [n for n, layer in holding if len(per_layer.names(layer)) == 1]
    if alone:
        raise StateError(
            f"minipissa.delete_adapter: '{name}' is the only adapter of module(s) {alone[:5]}, which would be left "
            "with none; delete another adapter, or minipissa.unload(model) for plain layers"
        )
    for _, layer in holding:
        per_layer.remove(layer, name)
    named.settle(model)
    return outer


@contextlib.contextmanager
def per_example(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """``with minipissa.per_example(model, ["math", "code", None]):`` example i of a batch (dimension 0 of every
    PiSSA layer's input) runs with adapter ``names[i]``; None (or an adapter a layer has not got) runs the original
    model. The examples of one adapter get bit for bit what the model with that adapter active gives them without
    the others (each group runs through the ops its adapter runs; an example's output in a group of several may
    differ from its output alone by the rounding of a matrix product of another row count, as in any model).
    For evaluation and serving: a forward in training mode with gradients is refused. Refused on a merged model and
    with modules trained in full (one set of values per model, not per example)."""
    outer, model = model, unwrap(model, "per_example")
    layers = adapted_layers(model, "per_example")
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
        raise StateError(
            f"minipissa.per_example: names must be a non-empty list of adapter names or None, got {names!r:.60}"
        )
    chosen = [None if n is None else named.known(layers, n, "per_example") for n in names]
    named.refuse_busy(layers, "per_example")
    if trained.names(model, "per_example"):
        raise StateError("minipissa.per_example: the model has modules trained in full, one set for all examples")
    before = [layer.mode for _, layer in layers]
    for _, layer in layers:
        layer.per_example = _inference_only(per_layer.per_example(layer, chosen), layer)
        layer.mode = "mixed"
    try:
        yield outer
    finally:
        for (_, layer), mode in zip(layers, before, strict=True):
            layer.mode = mode
            del layer.per_example


def _inference_only(forward: Any, layer: nn.Module) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        if layer.training and torch.is_grad_enabled():
            raise RuntimeError(
                "minipissa.per_example: a mixed batch is for inference; call model.eval() or run under "
                "torch.no_grad() (train one adapter at a time: minipissa.set_adapter)"
            )
        return forward(x)

    return run
