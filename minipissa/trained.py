"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``): a new classification head, say.

``apply(..., train_modules=[...])`` picks them; they then require gradients with the adapters; ``save`` stores
their parameters (tensors ``trained:<module>.<param>``, their names in the metadata's ``"trained"``); ``load``
checks every one against the model before anything changes, then restores them; the PEFT export writes them as
``modules_to_save``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import StateError
from .sharded.dtensor import full_tensor
from .targets import Targets, _as_list, matches

PREFIX = "trained:"
#: Per model, the names of its modules trained in full (weakly held: the record goes with the model).
_NAMES: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def names(model: nn.Module) -> tuple[str, ...]:
    """The modules of ``model`` trained in full, by name."""
    return _NAMES.get(model, ())


def mark(model: nn.Module, chosen: Sequence[str]) -> None:
    """Add ``chosen`` to the modules of ``model`` trained in full."""
    _NAMES[model] = tuple(sorted(set(names(model)) | set(chosen)))


def select(model: nn.Module, patterns: Targets | None, adapted: Sequence[str]) -> list[str]:
    """The modules ``patterns`` name (same forms as targets; any module kind), checked: each pattern matches, no
    module holds an adapted one or is held by one, every parameter is floating-point."""
    chosen = []
    modules = dict(model.named_modules())
    for pattern in _as_list(patterns, "train_modules"):
        found = [name for name in modules if name and matches(name, pattern)]
        if not found:
            raise ValueError(f"minipissa: train_modules pattern {pattern!r} matches no module of the model")
        chosen += found
    for name in chosen:
        clash = [a for a in adapted if a == name or a.startswith(name + ".") or name.startswith(a + ".")]
        if clash:
            raise ValueError(
                f"minipissa: module '{name}' is both trained in full (train_modules) and adapted ('{clash[0]}'); "
                "exclude it from the targets or from train_modules"
            )
        bad = [p for p, t in modules[name].named_parameters() if not t.is_floating_point()]
        if not list(modules[name].parameters()) or bad:
            raise ValueError(f"minipissa: module '{name}' has no floating-point parameters to train ({bad[:3]})")
    return sorted(set(chosen))


def pack(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """The tensors (``trained:<module>.<param>``) and metadata ({module: [param names]}) of the modules trained in
    full, for the adapter file."""
    tensors, meta = {}, {}
    for name in names(model):
        try:
            params = dict(model.get_submodule(name).named_parameters())
        except AttributeError:
            raise StateError(
                f"minipissa: module '{name}' was trained in full (train_modules) but is no longer in the model; put "
                "it back before saving or converting: the file must hold what was trained"
            ) from None
        meta[name] = sorted(params)
        tensors.update({f"{PREFIX}{name}.{p}": full_tensor(t.detach()).cpu() for p, t in params.items()})
    return tensors, meta


def unpack(meta: Any, tensors: dict[str, Tensor], where: str) -> dict[str, dict[str, Tensor]]:
    """The file's modules trained in full: {module: {param: tensor}}, every field and tensor checked (finite
    floating-point); takes their tensors out of ``tensors``."""
    if meta is None:
        meta = {}
    ok = isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, list) and v and all(isinstance(p, str) for p in v) for k, v in meta.items()
    )
    if not ok:
        raise StateError(f"{where}: the 'trained' metadata must map module names to parameter names")
    out: dict[str, dict[str, Tensor]] = {}
    for name, params in meta.items():
        keys = {p: f"{PREFIX}{name}.{p}" for p in params}
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise StateError(f"{where}: module '{name}' trained in full lacks tensors {missing[:3]}")
        out[name] = {p: tensors.pop(k) for p, k in keys.items()}
        for p, t in out[name].items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise StateError(f"{where}: '{name}.{p}' (trained in full) must hold finite floating-point values")
    stray = [k for k in tensors if k.startswith(PREFIX)]
    if stray:
        raise StateError(f"{where} holds tensors no module accounts for: {stray[:5]}")
    return out


def check(model: nn.Module, saved: dict[str, dict[str, Tensor]], where: str) -> None:
    """Each module trained in full exists in ``model`` with the same parameters, shapes and dtypes."""
    for name, params in saved.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise StateError(f"{where}: module '{name}' (trained in full) is not in the model") from None
        have = {p: (tuple(t.shape), t.dtype) for p, t in module.named_parameters()}
        want = {p: (tuple(t.shape), t.dtype) for p, t in params.items()}
        if have != want:
            raise StateError(
                f"{where}: module '{name}' (trained in full) has parameters {have} in the model, {want} in the file"
            )


def restore(model: nn.Module, saved: dict[str, dict[str, Tensor]]) -> None:
    """Copy the checked parameters in and mark their modules trained in full."""
    with torch.no_grad():
        for name, params in saved.items():
            own = dict(model.get_submodule(name).named_parameters())
            for p, t in params.items():
                own[p].copy_(t)
    mark(model, list(saved))
