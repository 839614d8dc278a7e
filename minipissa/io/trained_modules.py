"""The modules trained in full (plan/trained.py) in the adapter file: their parameters as tensors
``trained:<module>.<param>``, their values before training as ``trained0:<module>.<param>`` (format version 4), their
names in the metadata's ``"trained"``; read back with every field and tensor checked, and restored into a model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import Check
from ..core.dtensor import full_tensor
from ..core.errors import StateError
from ..nn.layer import PiSSALinear
from ..plan import trained

PREFIX = "trained:"
INITIAL = "trained0:"  # the values before training (format version 4)
_NAME = re.compile(r"[^.\s]+(\.[^.\s]+)*")


def pack(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """The tensors (``trained:<module>.<param>``, and ``trained0:`` for their values before training, where known)
    and metadata ({module: [param names]}) of the modules trained in full, for the adapter file."""
    tensors, meta = {}, {}
    found = trained.recorded(model, "save")
    if found and any(m.mode != "adapter" for m in model.modules() if isinstance(m, PiSSALinear)):
        raise StateError(
            "minipissa.save: inside minipissa.original()/disabled() the modules trained in full hold their values "
            "before training; save outside the context"
        )
    for name, (run, made) in found.items():
        params = dict(trained.module_of(model, name, "save").named_parameters())
        meta[name] = sorted(params)
        tensors.update({f"{PREFIX}{name}.{p}": full_tensor(t).cpu() for p, t in params.items()})
        initial = run.initial.get(made)
        if initial is not None:
            trained.same_parameters(initial, params, f"minipissa.save: module '{name}' (trained in full)")
            tensors.update({f"{INITIAL}{name}.{p}": t for p, t in initial.items()})
    return tensors, meta


def unpack(
    meta: Any, tensors: dict[str, Tensor], where: str
) -> tuple[dict[str, trained.Params], dict[str, trained.Params]]:
    """The file's modules trained in full: ({module: {param: tensor}}, the same before training where the file has
    them), every field and tensor checked (finite floating-point, the initial values shaped as the trained ones);
    takes their tensors out of ``tensors``. A module listed inside another (older saves kept nested train_modules)
    names some of the outer one's tensors again: left out, once its parameters are checked to be the outer's."""
    check = Check(where, StateError)
    if meta is None:
        meta = {}
    ok = isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, list) and v and all(isinstance(p, str) for p in v) for k, v in meta.items()
    )
    if not ok:
        check.refuse("the 'trained' metadata must map module names to parameter names")
    bad = [k for k in meta if not _NAME.fullmatch(k)]
    if bad:
        check.refuse(f"the 'trained' metadata names {bad[0]!r}, not a module path (the root is refused)")
    out: dict[str, trained.Params] = {}
    initial: dict[str, trained.Params] = {}
    for name in trained.outermost(list(meta)):
        keys = {p: f"{name}.{p}" for p in meta[name]}
        missing = [PREFIX + k for k in keys.values() if PREFIX + k not in tensors]
        if missing:
            check.refuse(f"module '{name}' trained in full lacks tensors {missing[:3]}")
        out[name] = {p: tensors.pop(PREFIX + k) for p, k in keys.items()}
        present = [INITIAL + k for k in keys.values() if INITIAL + k in tensors]
        if present and len(present) < len(keys):
            check.refuse(f"module '{name}' has initial values for some parameters only ({present[:3]})")
        if present:
            initial[name] = {p: tensors.pop(INITIAL + k) for p, k in keys.items()}
            trained.same_parameters(initial[name], out[name], f"{where}: module '{name}' (trained in full)")
        for p, t in [*out[name].items(), *initial.get(name, {}).items()]:
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                check.refuse(f"'{name}.{p}' (trained in full) must hold finite floating-point values")
    for inner in set(meta) - set(out):  # nested: each of its parameters must be one of the outer module's
        outer = next(o for o in out if inner.startswith(o + "."))
        rest = inner[len(outer) + 1 :]
        if not all(f"{rest}.{p}" in out[outer] for p in meta[inner]):
            check.refuse(f"module '{inner}' is inside '{outer}' but lists other parameters")
    stray = [k for k in tensors if k.startswith((PREFIX, INITIAL))]
    if stray:
        raise StateError(f"{where} holds tensors no module accounts for: {stray[:5]}")
    return out, initial


def check(model: nn.Module, saved: dict[str, trained.Params], adapted: Sequence[str], where: str) -> None:
    """Each module trained in full exists in ``model`` with the same parameters, shapes and dtypes, is not adapted
    (in ``adapted`` or a PiSSA layer of the model), neither holds nor is held by an adapted module; and every module
    the model trains in full now is one of them (else the load would drop it silently)."""
    adapted = [*adapted, *(n for n, m in model.named_modules() if isinstance(m, PiSSALinear))]
    for name, params in saved.items():
        clash = [a for a in adapted if a == name or a.startswith(name + ".") or name.startswith(a + ".")]
        if clash:
            raise StateError(
                f"{where}: module '{name}' is trained in full in the file but is (or holds, or is inside) the adapted "
                f"module '{clash[0]}'; restoring it would overwrite a residual. The file is crafted or corrupted"
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise StateError(f"{where}: module '{name}' (trained in full) is not in the model") from None
        own = dict(module.named_parameters())
        have = {p: (tuple(t.shape), t.dtype) for p, t in own.items()}
        want = {p: (tuple(t.shape), t.dtype) for p, t in params.items()}
        if {p: v[0] for p, v in have.items()} != {p: v[0] for p, v in want.items()} or not all(
            _fits(t, own[p]) for p, t in params.items()
        ):
            raise StateError(
                f"{where}: module '{name}' (trained in full) has parameters {have} in the model, {want} in the file"
            )
    dropped = sorted(set(trained.names(model, "load")) - set(saved))
    if dropped:
        raise StateError(
            f"{where}: the model trains {dropped[:5]} in full (train_modules), which the file does not; load onto "
            "the model the adapter was saved from, or onto the plain base model"
        )


def _fits(saved: Tensor, param: Tensor) -> bool:
    """Whether ``saved`` goes into ``param`` exactly: the same dtype, or one that holds each of its values (a float16
    head saved after model.half(), loaded onto the float32 model it was applied to and cast to float16 after)."""
    return saved.dtype == param.dtype or torch.equal(saved.to(param.dtype).to(saved.dtype), saved)


def restore(model: nn.Module, saved: dict[str, trained.Params]) -> None:
    """Copy the checked parameters in."""
    with torch.no_grad():
        for name, params in saved.items():
            own = dict(model.get_submodule(name).named_parameters())
            for p, t in params.items():
                own[p].copy_(t)
