"""save_residual() / load_residual(): decompose once, then train many runs on the residual base.

The file holds the model's own state-dict keys, with every PiSSA layer's ``weight`` holding
W_res (its A, B, A0, B0 left out: they belong in the adapter file written by ``save``). Tied
tensors (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are written once under their
first key and restored tied. Load the adapter on top with ``load(model, adapter, base="residual")``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from . import safefile
from .errors import PathLike, StateError
from .sharded.dtensor import full_tensor, is_dtensor, refuse_sharded, write_once
from .tree import adapted_layers, pissa_layers

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
    layers = dict(adapted_layers(model, "save_residual"))
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
    payload = {"tied": tied, "residual_modules": sorted(layers)}
    write_once(model, lambda: safefile.write(path, tensors, KIND, payload))  # rank 0 if sharded


def read(path: PathLike) -> tuple[dict[str, str], list[str], dict[str, Tensor]]:
    """The tied keys ({key: first key}), adapted module names and tensors of a residual file, every field checked."""
    info, tensors = safefile.read(path, KIND)
    tied, modules = info.get("tied"), info.get("residual_modules")
    strings = isinstance(modules, list) and all(isinstance(m, str) for m in modules)
    pairs = isinstance(tied, dict) and all(
        isinstance(v, str) and v in tensors and k not in tensors for k, v in tied.items()
    )
    if not (strings and pairs):
        raise StateError(f"minipissa: '{path}': the residual file's tied keys or module list are malformed")
    return cast(dict[str, str], tied), cast(list[str], modules), tensors


def load_residual(model: nn.Module, path: PathLike) -> nn.Module:
    """Copy the residual weights of ``path`` into a plain ``model`` (same architecture), in place.

    Checks every key, shape and dtype before copying anything; tied keys must be tied in the model, and the
    model's tensors must be real (not on the meta device) and not sharded.
    """
    where = f"minipissa.load_residual('{path}')"
    refuse_sharded(model, "load_residual")
    tied, _, tensors = read(path)
    if any(True for _ in pissa_layers(model)):
        raise StateError(f"{where}: the model already has PiSSA layers; load residual weights into a plain model")
    state = model.state_dict(keep_vars=True)
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
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)
    return model
