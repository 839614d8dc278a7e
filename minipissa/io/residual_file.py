"""save_residual() / load_residual(): decompose once, then train many runs on the residual base.

The file holds the model's own state-dict keys, with every PiSSA layer's ``weight`` holding
W_res (its A, B, A0, B0 left out: they belong in the adapter file written by ``save``). Tied
tensors (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are written once under their
first key and restored tied. Load the adapter on top with ``load(model, adapter, base="residual")``.

A QPiSSA layer's residual is stored as it is held, in 4 bits (``<module>.weight.codes`` and ``.absmax``: 0.5625
bytes per weight instead of 2 in bf16; double-quantized, ``.absmax_codes``, ``.absmax_scale`` and ``.absmax_offset``
in place of ``.absmax``: 0.516, and ``"double_quant": true`` in its entry), and loads bit-exactly into an
:class:`NF4Linear` in the module's place. A reader that knows nothing of double quantization refuses such an entry
(its ``.absmax`` is missing): it never loads other statistics.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.checks import Check
from ..core.dtensor import full_tensor, is_dtensor, refuse_sharded, write_once
from ..core.dtypes import FLOATS, dtype_name
from ..core.errors import PathLike, StateError
from ..core.nf4 import STATISTICS, NF4Weight
from ..core.nf4_stats import DoubleQuantized
from ..core.weights import is_conv1d
from ..nn import adapters as per_layer
from ..nn.nf4_linear import NF4Linear
from ..plan.targets import is_supported
from ..plan.tree import adapted_layers, module_aliases, pissa_layers, replace_module, unwrap
from . import safefile

KIND = "residual"


def _identity(t: Tensor) -> tuple[Any, ...]:
    """Two state-dict entries with the same identity are one tied tensor."""
    local = cast(Any, t).to_local() if is_dtensor(t) else t  # a DTensor's shard identifies it
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride(), t.dtype)


def save_residual(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s state dict with the residual weights and no adapter tensors, atomically.

    A merged layer contributes its exact residual, not the merged weight.
    """
    safefile.as_path(path)
    model = unwrap(model, "save_residual")
    layers = dict(adapted_layers(model, "save_residual"))
    several = [n for n, layer in layers.items() if len(per_layer.names(layer)) > 1 or per_layer.corrected(layer)]
    if several:
        raise StateError(
            f"minipissa.save_residual: module '{several[0]}' has several adapters (or one made on another's "
            "residual), whose residuals are not the one it stores; save each adapter with save(name=...) and load it "
            "onto the base model, or delete_adapter the others from a model whose residual is its own"
        )
    adapter_keys = {f"{name}.{k}" for name in layers for k in ("A", "B", "A0", "B0")}
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in adapter_keys}
    for name, layer in layers.items():
        if layer.residual_while_merged is not None:
            state[f"{name}.weight"] = layer.residual_while_merged
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    first_key: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        first = first_key.setdefault(_identity(value), key)
        if first != key:
            tied[key] = first
        else:
            tensors[key] = full_tensor(value)
    quantized = {
        name: {"shape": list(w.shape), "dtype": dtype_name(w.dtype), "fan_in_fan_out": layer.fan_in_fan_out}
        | ({"double_quant": True} if w.double_quant else {})  # only then: other files stay what they were
        for name, layer in layers.items() if isinstance(w := layer.weight, NF4Weight)
    }  # fmt: skip
    payload = {"tied": tied, "residual_modules": sorted(layers), "quantized": quantized}
    write_once(model, lambda: safefile.write(path, tensors, KIND, payload))  # rank 0 if sharded


def read(path: PathLike) -> tuple[dict[str, str], list[str], dict[str, Tensor], dict[str, NF4Weight]]:
    """The tied keys ({key: first key}), adapted module names, tensors and 4-bit residuals ({module: NF4Weight},
    their tensors taken out of ``tensors``) of a residual file, every field checked."""
    info, tensors = safefile.read(path, KIND)
    check = Check(f"minipissa: '{path}'", StateError)
    tied, modules = info.get("tied"), info.get("residual_modules")
    strings = isinstance(modules, list) and all(isinstance(m, str) for m in modules)
    pairs = isinstance(tied, dict) and all(
        isinstance(v, str) and v in tensors and k not in tensors for k, v in tied.items()
    )
    if not (strings and pairs):
        check.refuse("the residual file's tied keys or module list are malformed")
    quantized = {}
    for name, meta in _mapping(info.get("quantized", {}), check).items():
        quantized[name] = _nf4_weight(_mapping(meta, check), tensors, name, check.within(f"module '{name}'"))
    return cast(dict[str, str], tied), cast(list[str], modules), tensors, quantized


def _mapping(value: Any, check: Check) -> dict[str, Any]:
    if not isinstance(value, dict):
        check.refuse("the residual file's 4-bit entries are malformed")
    return value


def _nf4_weight(meta: dict[str, Any], tensors: dict[str, Tensor], name: str, check: Check) -> NF4Weight:
    """The 4-bit residual of module ``name``, its codes and statistics popped from ``tensors``."""
    shape, dtype = meta.get("shape"), FLOATS.get(meta.get("dtype"))  # type: ignore[arg-type]
    double_quant = meta.get("double_quant", False)  # absent: a file of before double quantization, or none
    names = STATISTICS[double_quant] if isinstance(double_quant, bool) else ()
    keys = [f"{name}.weight.{k}" for k in ("codes", *names)]
    well_formed = (
        isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)
        and dtype is not None and isinstance(meta.get("fan_in_fan_out"), bool) and isinstance(double_quant, bool)
        and all(k in tensors for k in keys)
    )  # fmt: skip
    if not well_formed:
        check.refuse("its 4-bit residual's shape, dtype, layout, double_quant or tensors are malformed")
    codes, *stats = (tensors.pop(k) for k in keys)
    try:
        weight = NF4Weight(
            codes, DoubleQuantized(*stats) if double_quant else stats[0], tuple(cast(list[int], shape)),
            cast(torch.dtype, dtype),
        )  # fmt: skip
    except ValueError as e:
        check.refuse(str(e))
    floats = stats[1:] if double_quant else stats  # the absmax, or the scales and offsets it is decoded with
    if not all(bool((torch.isfinite(t) & (t >= 0)).all()) for t in floats):
        check.refuse("its 4-bit residual's absmax (or its scales and offsets) holds negative or non-finite values")
    return weight


def load_residual(model: nn.Module, path: PathLike) -> nn.Module:
    """Copy the residual weights of ``path`` into a plain ``model`` (same architecture), in place.

    Checks every key, shape and dtype before copying anything; tied keys must be tied in the model, and the
    model's tensors must be real (not on the meta device) and not sharded. A 4-bit (QPiSSA) residual goes into
    an :class:`NF4Linear` put in its module's place (that module's weight may be on the meta device: it is not
    read); load the adapter on top with ``load(model, adapter, base="residual")``.
    """
    where = f"minipissa.load_residual('{path}')"
    refuse_sharded(model, "load_residual")
    outer, model = model, unwrap(model, "load_residual")
    tied, _, tensors, quantized = read(path)
    if any(True for _ in pissa_layers(model)):
        raise StateError(f"{where}: the model already has PiSSA layers; load residual weights into a plain model")
    modules = {name: _quantized_module(model, name, weight, where) for name, weight in quantized.items()}
    replaced = {f"{name}.weight" for name in quantized}
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in replaced}
    _check_state(state, tensors, tied, where)
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)
    aliases = module_aliases(model)
    for name, weight in quantized.items():
        module = modules[name]
        bias = cast(Tensor | None, module.bias)
        device = bias.device if bias is not None else cast(Tensor, module.weight).device
        weight = weight.to("cpu" if device.type == "meta" else device)
        replace_module(
            model, name, NF4Linear(module, weight, None if bias is None else bias.detach(), is_conv1d(module)), aliases
        )
    return outer


def _check_state(state: dict[str, Tensor], tensors: dict[str, Tensor], tied: dict[str, str], where: str) -> None:
    """The model's state (but the 4-bit residuals' weights) takes the file's tensors: the same keys, real tensors,
    tied where the file's are and only there, each of the file's shape and dtype."""
    expected = set(tensors) | set(tied)
    missing, extra = sorted(set(state) - expected), sorted(expected - set(state))
    if missing or extra:
        raise StateError(
            f"{where}: the model's state-dict keys differ from the file's: model-only {missing[:5]}, file-only "
            f"{extra[:5]}. Load into the architecture the residual was saved from"
        )
    meta = sorted(k for k, t in state.items() if t.is_meta)
    if meta:
        raise StateError(
            f"{where}: the model's tensors {meta[:5]} are on the meta device, where nothing can be copied; "
            "materialise the model first (e.g. model.to_empty(device='cpu'))"
        )
    for key, first in tied.items():
        if _identity(state[key]) != _identity(state[first]):
            raise StateError(f"{where}: '{key}' was tied to '{first}' when saved, but is not tied in the model")
    untied = [(k, j) for k in tensors for j in tensors if k < j and _identity(state[k]) == _identity(state[j])]
    if untied:
        raise StateError(
            f"{where}: '{untied[0][0]}' and '{untied[0][1]}' are one tensor in the model but two in the file; load "
            "into a model whose weights are tied as they were when saved"
        )
    for key, value in tensors.items():
        target = state[key]
        if tuple(target.shape) != tuple(value.shape) or target.dtype != value.dtype:
            raise StateError(
                f"{where}: '{key}' is {tuple(target.shape)} {target.dtype} in the model, {tuple(value.shape)} "
                f"{value.dtype} in the file"
            )


def _quantized_module(model: nn.Module, name: str, weight: NF4Weight, where: str) -> nn.Module:
    """The module a 4-bit residual goes in place of, checked: a Linear/Conv1D of that weight's shape and dtype."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise StateError(
            f"{where}: the model has no module '{name}'; load into the architecture it was saved from"
        ) from None
    stored = cast(Tensor | None, getattr(module, "weight", None))
    if not is_supported(module) or stored is None:
        raise StateError(f"{where}: '{name}' is a {type(module).__name__}; the file holds a Linear's 4-bit residual")
    if tuple(stored.shape) != weight.shape or stored.dtype != weight.dtype:
        raise StateError(
            f"{where}: '{name}' has a {tuple(stored.shape)} {stored.dtype} weight; the file's 4-bit residual stands "
            f"for {weight.shape} {weight.dtype}"
        )
    return module
