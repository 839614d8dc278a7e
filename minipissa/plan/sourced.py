"""A model built on the meta device whose tensors come from a :class:`Source` (apply's ``weights=``: a checkpoint or a
mapping, which io/checkpoint.py opens): every tensor the model needs, by the bare model's state-dict names (a tied
tensor once, under all its names), found and checked before anything changes. The targets' weights and biases go
through the streamed road (:meth:`ModelSource.read`, fetch.py); every other tensor is read onto the device here
(:meth:`ModelSource.load_rest`, checked as read) and put in place after the adapted layers (:meth:`Loaded.assign`).

Rules: every parameter must be on meta (real ones are refused, never overwritten); a buffer may hold a value already
(as the constructor made it: accelerate's ``init_empty_weights()`` leaves buffers real), which a persistent one's key in
the source replaces; a non-persistent buffer on meta is refused (no file holds it). Floating-point tensors are cast to
the model's dtype, as ``from_pretrained`` casts to its ``torch_dtype``; other dtypes must match. Keys the model does not
have are ignored (checkpoints carry tied heads, or buffers the model computes itself).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from ..core.errors import StateError
from .fetch import Transfers
from .tree import Plan


class Source(Protocol):
    """Tensors by state-dict key, read one at a time on demand (io/checkpoint.py: safetensors files, a mapping)."""

    what: str  #: what it is, for messages: "checkpoint '/path/model.safetensors'"
    parallel: bool  #: whether reads may run in several threads at once (else one at a time, in order)

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[str]:
        """Its keys (for messages only)."""
        ...

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None] | None:
        """(shape, dtype) of ``key`` where known without reading it (a file's header), else None; dtype None: one
        minipissa has no name for."""
        ...

    def read(self, key: str, pinned: bool = False) -> Tensor:
        """The tensor of ``key`` (host memory, or wherever the source holds it); ``pinned``: a host tensor in pinned
        memory (a CUDA fetch's staging), made with at most one host copy."""
        ...


@dataclass
class Slot:
    """One tensor of the model: every name it has, where it is registered, and the model's own (meta) tensor, whose
    shape and dtype the source's must have; ``key``: the name the source holds it under ("": none)."""

    tensor: Tensor
    names: list[str] = field(default_factory=list)
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    key: str = ""


def _where(message: str, fix: str) -> StateError:
    return StateError(f"minipissa.apply: weights=: {message}; nothing was changed. {fix}")


class ModelSource:
    """``model``'s tensors in ``source``, checked now (a named :class:`StateError`): parameters on meta, every
    parameter and meta buffer found, shapes and dtypes where the source knows them unread."""

    def __init__(self, model: nn.Module, source: Source) -> None:
        self.source = source
        slots: dict[int, Slot] = {}
        unset = []
        for prefix, module in model.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for attr, t in table.items():
                    name = f"{prefix}.{attr}" if prefix else attr
                    if t is None or (table is module._buffers and attr in module._non_persistent_buffers_set):
                        unset += [name] if t is not None and t.is_meta else []
                        continue
                    slot = slots.setdefault(id(t), Slot(t))
                    slot.names.append(name)
                    slot.owners.append((module, attr))
        real = [s for s in slots.values() if isinstance(s.tensor, nn.Parameter) and not s.tensor.is_meta]
        if real:
            raise _where(
                f"the model's parameter(s) {[s.names[0] for s in real[:3]]}{' ...' if len(real) > 3 else ''} hold "
                f"values already (on {real[0].tensor.device})",
                "weights= fills a model built on the meta device (with torch.device('meta'): model = ...); to adapt "
                "a model that holds its weights, leave weights=None",
            )
        if unset:
            raise _where(
                f"the model's non-persistent buffer(s) {unset[:3]} are on the meta device and no checkpoint holds them",
                "Give them values before apply(): build the model with only its parameters on meta (accelerate's "
                "init_empty_weights() keeps buffers real), or register the buffer again with its value",
            )
        for slot in slots.values():
            slot.key = next((n for n in slot.names if n in source), "")
        missing = [s.names for s in slots.values() if not s.key and s.tensor.is_meta]
        if missing:
            raise _where(
                f"{source.what} lacks {' / '.join(missing[0])}"
                f"{f' and {len(missing) - 1} more tensor(s)' if len(missing) > 1 else ''}, which the model needs; "
                f"its keys begin {[k for _, k in zip(range(3), source, strict=False)]}",
                "Is it this model's checkpoint? Build the model class the checkpoint was saved from (key prefixes "
                "differ between e.g. LlamaModel and LlamaForCausalLM)",
            )
        self.slots = [s for s in slots.values() if s.key]
        for slot in self.slots:
            spec = source.spec(slot.key)
            if spec is not None:
                self._check(slot, *spec)
        self._by_name = {name: slot for slot in self.slots for name in slot.names}

    @property
    def parallel(self) -> bool:
        """Whether the source's reads may run in several threads at once (:attr:`Source.parallel`)."""
        return self.source.parallel

    def _check(self, slot: Slot, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
        want = slot.tensor
        if tuple(shape) != tuple(want.shape):
            raise _where(
                f"'{slot.key}' of {self.source.what} has shape {tuple(shape)}, the model's '{slot.names[0]}' is "
                f"{tuple(want.shape)}",
                "Build the model from the checkpoint's own config",
            )
        if dtype != want.dtype and not (dtype is not None and dtype.is_floating_point and want.is_floating_point()):
            raise _where(
                f"'{slot.key}' of {self.source.what} is {dtype or 'of a dtype minipissa does not read'}, the model's "
                f"'{slot.names[0]}' is {want.dtype}",
                "Floating-point tensors are cast to the model's dtype; others must match it",
            )

    def read(self, name: str, pinned: bool = False) -> Tensor:
        """The source's tensor for the model's tensor ``name``, checked (its dtype may still differ: a float, cast
        where it is moved to); ``pinned``: as :meth:`Source.read`. A :data:`~minipissa.plan.fetch.Read`."""
        slot = self._by_name[name]
        value = self.source.read(slot.key, pinned)
        if not isinstance(value, Tensor):
            raise _where(f"'{slot.key}' of {self.source.what} is a {type(value).__name__}", "Give torch tensors")
        self._check(slot, tuple(value.shape), value.dtype)
        return value

    def load_rest(self, plans: Sequence[Plan], transfers: Transfers) -> Loaded:
        """Every tensor but the targets' weights and biases, read onto ``transfers``' device and checked: a parameter
        holding NaN or inf is refused (buffers may hold inf: attention masks do)."""
        targets = {f"{p.name}.{leaf}" for p in plans for leaf in ("weight", "bias")}
        rest = [s for s in self.slots if not targets & set(s.names)]
        read = functools.partial(self._read_one, pinned=transfers.cuda)
        pending = [transfers.submit(functools.partial(read, s), [s.tensor.dtype]) for s in rest]
        values = [cast(Tensor, transfers.result(p)[0]) for p in pending]
        floats = [(s, v) for s, v in zip(rest, values, strict=True) if isinstance(s.tensor, nn.Parameter)]
        floats = [(s, v) for s, v in floats if v.is_floating_point()]
        if floats:
            finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
            bad = [s.key for (s, _), ok in zip(floats, finite, strict=True) if not ok]
            if bad:
                raise _where(f"{bad[:5]} of {self.source.what} hold NaN or inf", "Check the checkpoint")
        return Loaded(list(zip(rest, values, strict=True)))

    def _read_one(self, slot: Slot, pinned: bool) -> list[Tensor | None]:
        return [self.read(slot.names[0], pinned)]


@dataclass
class Loaded:
    """The tensors :meth:`ModelSource.load_rest` read, to be put in place."""

    values: list[tuple[Slot, Tensor]]

    def assign(self) -> None:
        """Each tensor under every name it has (tied ones stay one Parameter), a parameter with the requires_grad its
        meta one has now."""
        for slot, value in self.values:
            old = slot.tensor
            new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
            for module, attr in slot.owners:
                setattr(module, attr, new)
        self.values = []
