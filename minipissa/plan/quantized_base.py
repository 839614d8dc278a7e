"""Targets that are already 4-bit: a bitsandbytes ``Linear4bit`` (its weight a ``Params4bit``) or minipissa's own
:class:`~minipissa.nn.nf4_linear.NF4Linear` (its absmax float32 or double-quantized). PiSSA decomposes their
dequantized weight W_deq; with ``quantize="nf4"`` (QPiSSA) the new residual W_deq - s·B0·A0 is quantized to 4 bits
again: a second rounding on top of the checkpoint's (all-MiniLM-L6-v2, r = 16: 12.5 % from W at init against the
checkpoint's own 9.4 %, benchmarks/qpissa_from_4bit.py); without ``quantize`` the residual stays dense (exactly
W_deq at init) and the model grows to 16 bits for those layers.

:func:`dense_weight` is the one reader, for any road that fetches a target's weight; :func:`dense_stand_in` the
module a PiSSA layer is built on in place of a 4-bit one (what apply() and load() plan with). bitsandbytes is never
imported: its objects are recognised by their attributes (bitsandbytes 0.50.2's ``Params4bit.quant_state``,
``bnb_quantized``, ``quant_type``; ``QuantState.absmax``, ``shape``, ``dtype``, ``blocksize``, ``offset``,
``state2``; a ``Linear4bit`` also keeps the state as ``module.quant_state``). What cannot be read exactly is refused
by name before anything changes: fp4 (and any quant_type but nf4), blocksize 32, a missing state, a weight repacked
for bitsandbytes' CPU kernel (its absmax rounded to bfloat16), a sharded one. PEFT's PiSSA init reads the packed
bytes of a float-storage 4-bit layer as if they were the weight (peft#3742): here the storage dtype never decides.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core import nf4_read
from ..core.dtensor import is_dtensor
from ..core.errors import StateError
from ..nn.nf4_linear import NF4Linear

STATE_FIELDS = ("absmax", "shape", "dtype", "blocksize", "quant_type")


def _is_state(state: object) -> bool:
    return state is not None and all(hasattr(state, f) for f in STATE_FIELDS)


def _params4bit(weight: object) -> bool:
    return all(hasattr(weight, f) for f in ("quant_state", "quant_type", "bnb_quantized"))


def is_four_bit(module: nn.Module) -> bool:
    """Whether ``module`` holds a 4-bit weight that :func:`dense_weight` reads (or refuses by name)."""
    if isinstance(module, NF4Linear):
        return True
    return _params4bit(getattr(module, "weight", None)) or _is_state(getattr(module, "quant_state", None))


def _refuse(name: str, found: str, todo: str) -> StateError:
    return StateError(f"minipissa: module '{name}' is a 4-bit layer holding {found}; {todo}. Nothing was changed")


def _read(name: str, module: nn.Module) -> nf4_read.Packed4bit | Tensor | None:
    """A bitsandbytes 4-bit module's packed weight, checked; its float weight if bitsandbytes has not quantized it
    yet (it does at the first ``.to(device)``); None if it is no such module."""
    if isinstance(module, NF4Linear) or not is_four_bit(module):
        return None
    weight = cast(Any, module.weight)
    state = getattr(weight, "quant_state", None) if _params4bit(weight) else None
    state = state if state is not None else getattr(module, "quant_state", None)  # as bitsandbytes' forward does
    out_in = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if not isinstance(weight, Tensor):
        raise _refuse(name, f"a weight of type {type(weight).__name__}", "exclude it")
    if is_dtensor(weight):
        raise _refuse(name, "a sharded (DTensor) weight", "apply PiSSA before fully_shard")
    if state is None and getattr(weight, "bnb_quantized", True) is False:
        if weight.is_floating_point() and tuple(weight.shape) == out_in:
            return cast(Tensor, weight.data)  # the float weight itself, not yet quantized: decomposed as it is
        raise _refuse(name, f"an unquantized {tuple(weight.shape)} {weight.dtype} weight", "quantize it first")
    if not _is_state(state):
        raise _refuse(
            name, "no quantization state (Params4bit.quant_state)", "load it through bitsandbytes (from_pretrained "
            "with a BitsAndBytesConfig, or Linear4bit.to(device)) so that it has one, or exclude it",
        )  # fmt: skip
    packed = _packed(name, weight, state)
    if len(packed.shape) != 2 or (None not in out_in and packed.shape != out_in):
        raise _refuse(name, f"a 4-bit weight of shape {packed.shape} in a module of (out, in) = {out_in}", "exclude it")
    return packed


def _packed(name: str, weight: Tensor, state: Any) -> nf4_read.Packed4bit:
    """bitsandbytes' QuantState of ``weight`` as a :class:`~minipissa.core.nf4_read.Packed4bit`, checked."""
    if state.quant_type != "nf4":
        raise _refuse(
            name, f"quant_type {state.quant_type!r}", "minipissa reads NF4 only. Dequantize it into an nn.Linear "
            "first (bitsandbytes.functional.dequantize_4bit), or quantize the model with bnb_4bit_quant_type='nf4'",
        )  # fmt: skip
    if getattr(state, "packing_format_for_cpu", False):
        raise _refuse(
            name, "a weight bitsandbytes repacked for its CPU kernel (an eval forward on an AVX512-BF16 CPU rounds "
            "its absmax to bfloat16)", "load the 4-bit model again and apply PiSSA before running it on the CPU",
        )  # fmt: skip
    nested, state2 = None, getattr(state, "state2", None)
    if state2 is not None:
        offset = getattr(state, "offset", None)
        offset = torch.tensor(offset, dtype=torch.float32) if isinstance(offset, float) else offset
        nested = nf4_read.Nested(state2.absmax, state2.code, state2.blocksize, cast(Tensor, offset))  # None: refused
    shape = tuple(state.shape) if state.shape is not None else ()
    packed = nf4_read.Packed4bit(
        nf4_read.packed_bytes(weight), state.absmax, state.blocksize, shape, state.dtype, nested
    )
    wrong = nf4_read.problem(packed)
    if wrong is not None:
        raise _refuse(name, wrong, "minipissa cannot read it exactly: dequantize it yourself, or exclude it")
    return packed


def with_dense_weights(found: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``found`` (name, module) with each 4-bit module in it replaced by its :func:`dense_stand_in`: what apply()
    plans with, so that every check and the factor stream see the dequantized weight. A named :class:`StateError`
    for the first one that cannot be read, before any is dequantized. In place, the dense weights of all 4-bit
    targets are held at once, until each one's layer is built."""
    for name, module in found:
        _read(name, module)  # metadata checks only
    return [(name, dense_stand_in(name, module) or module) for name, module in found]


def dense_weight(module: nn.Module, name: str = "module") -> Tensor | None:
    """The dequantized weight of a 4-bit ``module`` (``name``: for errors), or None if it is not 4-bit.

    A new tensor in its stored layout (``Linear4bit``: (out, in); an NF4Linear: as its shell stores it, Conv1D's
    (in, out)), in the dtype it stands for (the quant state's), on the weight's device, equal to bitsandbytes'
    ``dequantize_4bit`` (single or double quantized). A Params4bit not yet quantized gives its float weight (not a
    copy). Raises a named :class:`StateError` for what it cannot read (module docstring).
    """
    if isinstance(module, NF4Linear):
        return module.weight.dequantize()
    read = _read(name, module)
    return read if read is None or isinstance(read, Tensor) else nf4_read.dequantize(read)


def dense_stand_in(name: str, module: nn.Module) -> nn.Module | None:
    """What a PiSSA layer is built on in place of a 4-bit ``module``, or None if it is not 4-bit: a plain
    ``nn.Linear`` (bitsandbytes) or a copy of the NF4Linear's shell (its Linear/Conv1D class), holding
    :func:`dense_weight` as a frozen Parameter and the module's very bias. Off the model tree; ``module`` is left as
    it is. The layer takes both over (and frees the dense weight once its residual is made); its ``unload()`` gives
    back this class with the merged 16-bit weight, not a 4-bit layer."""
    weight = dense_weight(module, name)
    if weight is None:
        return None
    if isinstance(module, NF4Linear):
        shell = copy.copy(module.shell[0])
        shell._parameters = dict(shell._parameters)  # its own table: the NF4Linear's shell stays as it is
    else:
        out_features, in_features = weight.shape
        shell = nn.Linear(in_features, out_features, bias=False, device="meta")
    shell.weight = nn.Parameter(weight, requires_grad=False)
    shell.bias = cast(Any, module.bias)
    return shell
