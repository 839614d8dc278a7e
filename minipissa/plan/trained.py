"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``): a new classification head, say.

``apply(..., train_modules=[...])`` picks them; they then require gradients with the adapters; ``save`` stores
their parameters (tensors ``trained:<module>.<param>``, their names in the metadata's ``"trained"``) and their values
before training (``trained0:<module>.<param>``, format version 4); ``load`` checks every one against the model before
anything changes, then restores them; ``original()``/``disabled()`` compute with the values before training; the PEFT
export writes them as ``modules_to_save``.

Which modules these are is state of the model, so it lives on minipissa's own modules: each PiSSA layer holds the
:class:`Run` of the apply() or load() that made it (shared by that run's layers) and its own name under the root it
was made under (:class:`Origin`). Where the layer is found now gives that root's place in whatever the model has
become since (a copy, a pickle, a DDP or ``nn.ModuleDict`` wrapper, a submodule), and so the modules' names there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..core.dtensor import full_tensor, is_dtensor
from ..core.errors import StateError
from ..core.host import host_copies
from ..nn.layer import PiSSALinear
from .targets import Targets, _as_list, matches

Params = dict[str, Tensor]  # {parameter name in its module: tensor}


@dataclass(eq=False)
class Run:
    """What one apply() or load() recorded, held by every PiSSA layer it made or loaded (one object for them all).

    ``names``: the modules trained in full, by their names under the root the run had. ``initial``: their parameters
    before training, in host memory (a module missing: not known, as after loading a format-3 file). ``seconds``:
    how long apply() took (:func:`~minipissa.summary`)."""

    names: tuple[str, ...] = ()
    initial: dict[str, Params] = field(default_factory=dict)
    seconds: float | None = None


@dataclass(frozen=True, eq=False)
class Origin:
    """A PiSSA layer's :class:`Run`, and the layer's own name under that run's root."""

    name: str
    run: Run


def outermost(chosen: Sequence[str]) -> list[str]:
    """``chosen`` without the modules inside another one of them (a module trained in full trains its children)."""
    return sorted({n for n in chosen if not any(n.startswith(o + ".") for o in chosen)})


def select(model: nn.Module, patterns: Targets | None, adapted: Sequence[str]) -> list[str]:
    """The modules ``patterns`` name (same forms as targets; any module kind), checked: each pattern matches, no
    module holds an adapted one (of ``adapted`` or already a PiSSA layer) or is held by one, every parameter is
    floating-point. A module inside another chosen one is left out (its parameters are trained anyway): so the
    names never nest, and the file has each parameter once."""
    chosen = []
    modules = dict(model.named_modules())
    adapted = [*adapted, *(n for n, m in modules.items() if isinstance(m, PiSSALinear))]
    for pattern in _as_list(patterns, "train_modules"):
        found = [name for name in modules if name and matches(name, pattern)]
        if not found:
            raise ValueError(f"minipissa: train_modules pattern {pattern!r} matches no module of the model")
        chosen += found
    chosen = outermost(chosen)  # checked as trained: a child without parameters of its own is fine
    for name in chosen + [n for n in names(model, "apply") if n not in chosen]:  # an earlier apply's too
        clash = [a for a in adapted if a == name or a.startswith(name + ".") or name.startswith(a + ".")]
        if clash:
            raise ValueError(
                f"minipissa: module '{name}' is both trained in full (train_modules) and adapted ('{clash[0]}'); "
                "exclude it from the targets or from train_modules"
            )
    for name in chosen:
        bad = [p for p, t in modules[name].named_parameters() if not t.is_floating_point()]
        if not list(modules[name].parameters()) or bad:
            raise ValueError(f"minipissa: module '{name}' has no floating-point parameters to train ({bad[:3]})")
    return chosen


def initial_values(model: nn.Module, names: Sequence[str]) -> dict[str, Params]:
    """Host copies of the parameters of the modules ``names`` now, before training (whole tensors if sharded)."""
    flat = [(n, p, full_tensor(t)) for n in names for p, t in model.get_submodule(n).named_parameters()]
    out: dict[str, Params] = {n: {} for n in names}
    for (n, p, _), copy in zip(flat, host_copies([t for _, _, t in flat]), strict=True):
        out[n][p] = copy
    return out


def _relation(found: str, made: str) -> tuple[str, str] | None:
    """(add, strip) such that a name ``n`` under the root a layer was made under (``made``: its name there) is
    ``add + n[len(strip):]`` under the model it is ``found`` in now; None if the two names do not fit."""
    if found == made:
        return "", ""
    if found.endswith("." + made):  # wrapped: the old root is the module at found[:-len(made)]
        return found[: -len(made)], ""
    if not found or made.endswith("." + found):  # a submodule of the old root
        return "", made + "." if not found else made[: -len(found)]
    return None


def recorded(model: nn.Module, what: str) -> dict[str, tuple[Run, str]]:
    """The modules trained in full of ``model``: {name in ``model``: (their run, their name under its root)},
    outermost only. A StateError if a layer has moved so that where its run's root is cannot be told."""
    aliases: dict[int, tuple[PiSSALinear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PiSSALinear):
            aliases.setdefault(id(module), (module, []))[1].append(name)
    out: dict[str, tuple[Run, str]] = {}
    relations: dict[int, tuple[str, str]] = {}  # per run: one place of its root for all its layers
    for layer, found in aliases.values():
        origin: Origin | None = getattr(layer, "origin", None)  # None: pickled by a minipissa without it
        if origin is None or not origin.run.names:
            continue
        fits = [r for r in (_relation(f, origin.name) for f in found) if r is not None]
        if not fits or relations.setdefault(id(origin.run), fits[0]) not in fits:
            raise StateError(
                f"minipissa.{what}: the PiSSA layer made as '{origin.name}' is now at '{found[0]}', so where the "
                f"modules trained in full beside it ({list(origin.run.names)}) are cannot be told; keep the "
                "model's module paths as apply()/load() saw them (wrapping the whole model is fine)"
            )
        add, strip = relations[id(origin.run)]
        for n in origin.run.names:
            if n.startswith(strip):
                out.setdefault(add + n[len(strip) :], (origin.run, n))
    return {n: out[n] for n in outermost(list(out))}


def names(model: nn.Module, what: str = "save") -> tuple[str, ...]:
    """The modules of ``model`` trained in full, by name."""
    return tuple(recorded(model, what))


def init_seconds(model: nn.Module) -> float | None:
    """How long the apply() runs that made ``model``'s PiSSA layers took, together (None if none was timed)."""
    origins = [getattr(m, "origin", None) for m in model.modules() if isinstance(m, PiSSALinear)]
    runs = {id(o.run): o.run for o in origins if o is not None}
    timed = [run.seconds for run in runs.values() if run.seconds is not None]
    return sum(timed) if timed else None


def module_of(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise StateError(
            f"minipissa.{what}: module '{name}' is trained in full (train_modules) but is no longer in the model; "
            "put it back, or apply() again"
        ) from None


def same_parameters(initial: Params, params: dict[str, Any], where: str) -> None:
    have = {p: tuple(t.shape) for p, t in params.items()}
    was = {p: tuple(t.shape) for p, t in initial.items()}
    if have != was:
        raise StateError(f"{where} has parameters {have}, but {was} before training")


def computing_with_initial(model: nn.Module, what: str) -> contextlib.AbstractContextManager[None]:
    """A context in which the modules trained in full compute with their values before training; everything is
    checked now, before the context changes anything."""
    found = recorded(model, what)
    unknown = [name for name, (run, made) in found.items() if made not in run.initial]
    if unknown:
        raise StateError(
            f"minipissa.{what}(): modules {unknown[:5]} are trained in full, but their values before training are "
            "not known: the adapter was loaded from a file of format version 3 or older, which did not store them, so "
            "the model before training cannot be computed exactly. Files saved after apply() by minipissa with "
            "format version 4 store them"
        )
    replace: dict[int, nn.Parameter] = {}
    for name, (run, made) in found.items():
        params = dict(module_of(model, name, what).named_parameters())
        same_parameters(run.initial[made], params, f"minipissa.{what}(): module '{name}' (trained in full)")
        for p, t in params.items():
            if is_dtensor(t):
                raise StateError(
                    f"minipissa.{what}(): '{name}.{p}' (trained in full) is sharded (FSDP2), and FSDP2 puts its own "
                    "tensors in place at each forward, so the values before training cannot be swapped in; compute "
                    "the reference from a model whose modules trained in full are not sharded"
                )
            # A copy: the context's tensor must never be the stored one (it is the same on a CPU model otherwise).
            replace[id(t)] = nn.Parameter(run.initial[made][p].to(t.device, t.dtype, copy=True), requires_grad=False)
    if not replace:
        return contextlib.nullcontext()
    # Every name each such Parameter has (a tied weight too): all of them compute with the initial values.
    owners = [
        (model.get_submodule(full.rpartition(".")[0]), full.rpartition(".")[2], t)
        for full, t in model.named_parameters(remove_duplicate=False)
        if id(t) in replace
    ]

    @contextlib.contextmanager
    def swapped() -> Iterator[None]:
        # Other Parameter objects for the context, the trained ones put back after: no value of a trained Parameter
        # is ever written, so tensors computed from it before or after (a policy forward awaiting backward, in DPO)
        # keep a valid autograd graph, which an in-place copy in and out would break (its version counter).
        for owner, leaf, t in owners:
            setattr(owner, leaf, replace[id(t)])
        try:
            yield
        finally:
            for owner, leaf, t in owners:
                setattr(owner, leaf, t)

    return swapped()
