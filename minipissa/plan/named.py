"""The named adapters of a whole model: their names, the active one, switching (for good, or for the length of a
save or a load), and the checks every change of them runs first. Per layer, nn/adapters.py does the work.

Every PiSSA layer knows the model's active adapter (``layer.active``); a layer that does not have it computes the
original weight (mode "absent"), so that adapters may adapt different modules. A model with one adapter is named
"default" unless it was given a name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..core.dtensor import is_dtensor
from ..core.errors import StateError
from ..nn import adapters as per_layer
from ..nn.layer import PiSSALinear
from . import trained
from .config import RECORDED, UNLESS_DEFAULT
from .tree import pissa_layers

DEFAULT = "default"
#: Recorded init options that layers made before QPiSSA (or double quantization) lack, and their values there.
OLD_DEFAULTS = {"quantize": None, "quant_iters": 1, **UNLESS_DEFAULT}
#: Layer modes of the contexts original(), disabled() and per_example(): no adapter changes inside them.
CONTEXTS = ("original", "disabled", "mixed")


def check_name(name: object, what: str) -> str:
    """``name`` if it can name an adapter (a key of the layers' ``adapters`` ModuleDict); a named error if not."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise StateError(
            f"minipissa.{what}: an adapter name must be a non-empty str without '.' that is no attribute of "
            f"nn.ModuleDict, e.g. 'math'; got {name!r:.60}"
        )
    return name


def init_options(info: dict[str, object]) -> tuple[object, ...]:
    """The values of every recorded init option (:data:`RECORDED`) in a layer's or a record's ``info``."""
    return tuple(info.get(k, OLD_DEFAULTS.get(k)) for k in RECORDED)


#: A model, or its PiSSA layers (name, layer) already found (switching walks the model's modules once).
Layers = nn.Module | list[tuple[str, PiSSALinear]]


def _layers(model: Layers) -> list[tuple[str, PiSSALinear]]:
    return model if isinstance(model, list) else list(pissa_layers(model))  # a named error for a non-module


def adapter_names(model: Layers) -> list[str]:
    """Every adapter's name, in the order the model's layers first show them."""
    found: dict[str, None] = {}
    for _, layer in _layers(model):
        found.update(dict.fromkeys(per_layer.names(layer)))
    return list(found)


def active(model: Layers) -> str | None:
    """The model's active adapter (None: no PiSSA layers)."""
    seen = {layer.active for _, layer in _layers(model)}
    if len(seen) > 1:
        raise StateError(
            f"minipissa: the model's PiSSA layers have different active adapters {sorted(seen)} (layers of two models "
            "put together?); call minipissa.set_adapter(model, name)"
        )
    return next(iter(seen), None)


def known(model: Layers, name: object, what: str) -> str:
    """``name`` if the model has an adapter of that name; a named error listing them if not."""
    have = adapter_names(model)
    if name not in have:
        raise StateError(f"minipissa.{what}: the model has no adapter named {name!r:.60}; it has {have}")
    return str(name)


def target(model: nn.Module, name: object, what: str) -> str:
    """The adapter a save, load or conversion works on: ``name``, or the active one (``"default"`` on a model with
    no PiSSA layers yet)."""
    if name is None:
        return active(model) or DEFAULT
    return check_name(name, what)


def refuse_busy(layers: Sequence[tuple[str, PiSSALinear]], what: str) -> None:
    """A named error, before anything changes, if the adapters of these layers cannot be switched or changed now:
    merged (the weight holds one of them), inside original()/disabled()/per_example(), or sharded (FSDP2 holds the
    parameters it sharded where they are)."""
    for name, layer in layers:
        if layer.merged:
            raise StateError(
                f"minipissa.{what}: module '{name}' is merged (its weight holds the active adapter), so adapters "
                "cannot be switched or changed; call minipissa.unmerge(model) first"
            )
        if layer.mode in CONTEXTS:
            raise StateError(
                f"minipissa.{what}: not inside minipissa.original(), disabled() or per_example() (module '{name}'); "
                "leave the context first"
            )
        if is_dtensor(layer.A):
            raise StateError(
                f"minipissa.{what}: module '{name}' is sharded (FSDP2); change adapters before fully_shard"
            )


def refuse_several(model: nn.Module, what: str, file_trained: bool = False, file_biases: bool = False) -> None:
    """Modules trained in full and trained biases belong to one adapter, while a model has one set of them: a second
    adapter is refused beside them (``file_*``: the adapter to add has them)."""
    if file_trained or trained.names(model, what):
        raise StateError(
            f"minipissa.{what}: modules trained in full (train_modules) belong to one adapter, and a model holds one "
            "set of them: several adapters cannot be combined with them; nothing was changed"
        )
    biased = [n for n, layer in pissa_layers(model) if layer.bias is not None and layer.bias.requires_grad]
    if file_biases or biased:
        where = f" (module '{biased[0]}')" if biased else ""
        raise StateError(
            f"minipissa.{what}: a bias trained beside an adapter{where} belongs to it, and the base holds one bias: "
            "several adapters cannot be combined with trained biases; nothing was changed"
        )


@contextlib.contextmanager
def switched(model: nn.Module, name: str, what: str) -> Iterator[list[tuple[str, PiSSALinear]]]:
    """For the length of the context, adapter ``name`` is the one each layer that has it holds (no requires_grad, no
    mode changes: for save, load and conversion, which read or write the layers' own adapter); yields those layers."""
    layers = list(pissa_layers(model))
    moved = [(n, layer) for n, layer in layers if per_layer.holder(layer, name) not in (None, layer)]
    refuse_busy(moved, what)
    before = [layer.adapter_name for _, layer in moved]
    for _, layer in moved:
        per_layer.swap(layer, name)
    try:
        yield [(n, layer) for n, layer in layers if per_layer.holder(layer, name) is layer]
    finally:
        for (_, layer), previous in zip(moved, before, strict=True):
            if per_layer.holder(layer, previous) is not layer:
                per_layer.swap(layer, previous)


def settle(model: Layers, name: str | None = None) -> None:
    """Make ``name`` (default: the model's active adapter) active on every layer: each layer that has it holds it,
    with its A and B alone requiring grad among the adapters; the others compute the original weight."""
    layers = _layers(model)
    name = name or active(layers) or DEFAULT
    for _, layer in layers:
        per_layer.settle(layer, name)


def adopt(model: nn.Module, layers: Sequence[PiSSALinear], name: str, was_active: str | None) -> None:
    """New layers (apply, load) of adapter ``name``, named so; then the model settled with ``was_active`` (its
    active adapter before they came; None: it had no PiSSA layers, and ``name`` is active now)."""
    for layer in layers:
        layer.adapter_name = layer.active = name
        layer.order = [name]
    settle(model, was_active or name)


def refuse_other_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[int, str], adapter: str
) -> None:
    """The optimizer state in the file belongs to the adapter saved: an optimizer over another adapter's A or B is
    refused by name (not taken for the saved one's)."""
    others = {id(p): slot_name for _, layer in pissa_layers(model) for slot_name, slot in per_layer.slots(layer).items()
              for p in (slot.A, slot.B)}  # fmt: skip
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in params and id(param) in others:
                raise StateError(
                    f"minipissa.save(optimizer=): the optimizer holds parameters of adapter '{others[id(param)]}', and "
                    f"the file is adapter '{adapter}''s; give save() the optimizer of the adapter saved (name=...)"
                )
