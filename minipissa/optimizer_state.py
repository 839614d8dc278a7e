"""An optimizer's state for the adapter parameters as tensors + JSON, so training resumes without pickle.

Tensor state (e.g. AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``) goes into the file under
``optimizer:<param name>:<key>``; scalars and the param groups' hyperparameters into the metadata.
Parameters are identified by name (``<module path>.A`` / ``.B``), never by position, so a
resumed optimizer may list them in another order.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import torch
from torch import Tensor

from .errors import StateError
from .sharded.dtensor import full_tensor

PREFIX = "optimizer:"
SCALARS = (bool, int, float, str, type(None))


def pack(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of ``optimizer``'s state; ``names`` maps id(parameter) to its name."""
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, Any] = {}
    groups = []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group_names = []
        for param, index in zip(group["params"], saved_group["params"], strict=True):
            name = names.get(id(param))
            if name is None:
                raise StateError(
                    f"minipissa.save(optimizer=): the optimizer holds a parameter of shape {tuple(param.shape)} that "
                    "is not a PiSSA A/B of the model; the adapter file only holds adapters. Give save() an "
                    "optimizer over the adapter parameters only, and checkpoint other parameters yourself"
                )
            group_names.append(name)
            entry: dict[str, Any] = {"scalars": {}, "tensors": []}
            for key, value in saved["state"].get(index, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{PREFIX}{name}:{key}"] = full_tensor(value).cpu()
                    entry["tensors"].append(key)
                elif isinstance(value, SCALARS):
                    entry["scalars"][key] = value
                else:
                    raise StateError(f"minipissa.save(optimizer=): state '{key}' of '{name}' is a {type(value)}")
            state[name] = entry
        hyper = {k: v for k, v in saved_group.items() if k not in ("params", "param_names")}
        try:
            json.dumps(hyper)
        except TypeError as e:
            raise StateError(
                f"minipissa.save(optimizer=): a param-group hyperparameter is not JSON-able ({e})"
            ) from None
        tuples = sorted(k for k, v in hyper.items() if isinstance(v, tuple))
        groups.append({"params": group_names, "hyper": hyper, "tuples": tuples})
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": state}


def check_meta(meta: dict[str, Any], where: str) -> None:
    """A StateError unless ``meta`` has the structure :func:`pack` writes (values are checked by :func:`unpack`)."""

    def fail(what: str) -> NoReturn:
        raise StateError(f"{where}: the optimizer state's {what} is malformed; the file is corrupted or crafted")

    if set(meta) != {"class", "param_groups", "state"} or not isinstance(meta["class"], str):
        fail("header")
    groups, state = meta["param_groups"], meta["state"]
    if not isinstance(groups, list) or not isinstance(state, dict):
        fail("layout")
    for group in groups:
        if not (isinstance(group, dict) and set(group) == {"params", "hyper", "tuples"}):
            fail("param group")
        if not (_strings(group["params"]) and _strings(group["tuples"]) and isinstance(group["hyper"], dict)):
            fail("param group")
        if not set(group["tuples"]) <= set(group["hyper"]):
            fail("param group's tuples")
        for key, value in group["hyper"].items():
            ok = isinstance(value, SCALARS) or (isinstance(value, list) and all(isinstance(v, SCALARS) for v in value))
            if not ok or (key in group["tuples"]) != isinstance(value, list):
                fail(f"hyperparameter '{key}'")
    for name, entry in state.items():
        if not (isinstance(entry, dict) and set(entry) == {"scalars", "tensors"} and _strings(entry["tensors"])):
            fail(f"state of '{name}'")
        if not (isinstance(entry["scalars"], dict) and all(isinstance(v, SCALARS) for v in entry["scalars"].values())):
            fail(f"state of '{name}'")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a saved hyperparameter can stand where the optimizer has ``live`` (a number for a number...)."""
    if isinstance(live, bool) or live is None:  # flags such as foreach, fused: None means "default"
        return saved is None or isinstance(saved, bool)
    if isinstance(live, str):
        return isinstance(saved, str)
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(live, (tuple, list)):
        return isinstance(saved, tuple) and len(saved) == len(live) and all(map(_same_kind, saved, live))
    return True  # a Tensor lr (capturable optimizers) or anything else: load_state_dict handles it


def unpack(
    optimizer: torch.optim.Optimizer,
    params: dict[str, Tensor],
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    path: str,
) -> dict[str, Any]:
    """A state dict for ``optimizer.load_state_dict`` from the saved state (``meta`` passed :func:`check_meta`);
    checks everything first: classes, groups, hyperparameter kinds, and each state tensor's shape and dtype.

    ``params`` maps each adapter parameter's name to the model's parameter.
    """
    where = f"minipissa.load(optimizer=) from '{path}'"
    if meta["class"] != type(optimizer).__name__:
        raise StateError(f"{where}: the state is for a {meta['class']}, the optimizer is a {type(optimizer).__name__}")
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise StateError(
            f"{where}: the file has {len(saved_groups)} param groups, the optimizer {len(optimizer.param_groups)}"
        )
    by_id = {id(p): name for name, p in params.items()}
    used = set()
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        found = [by_id.get(id(p)) for p in group["params"]]
        names = [n for n in found if n is not None]
        if len(names) != len(found):
            raise StateError(f"{where}: param group {i} holds parameters that are not the model's PiSSA A/B")
        if sorted(names) != sorted(saved["params"]):
            raise StateError(f"{where}: param group {i} holds {sorted(names)}, the file {saved['params']}")
        hyper = dict(saved["hyper"]) | {k: tuple(saved["hyper"][k]) for k in saved["tuples"]}
        wrong = [k for k, v in hyper.items() if k in group and not _same_kind(v, group[k])]
        if wrong:
            raise StateError(f"{where}: param group {i}'s {wrong[:3]} do not fit the optimizer's (e.g. a str lr)")
        ids = []
        for name in names:
            entry = meta["state"].get(name)
            if entry is not None:
                keys = [f"{PREFIX}{name}:{k}" for k in entry["tensors"]]
                if any(k not in tensors for k in keys):
                    raise StateError(f"{where}: optimizer tensors of '{name}' are missing; the file is incomplete")
                for key in keys:
                    _check_tensor(tensors[key], params[name], f"{where}: '{key}'")
                used.update(keys)
                state[index] = entry["scalars"] | {
                    k: tensors[key] for k, key in zip(entry["tensors"], keys, strict=True)
                }
            ids.append(index)
            index += 1
        groups.append(hyper | {"params": ids})
    unused = sorted(set(tensors) - used)
    if unused:
        raise StateError(f"{where}: the file holds optimizer tensors no parameter accounts for: {unused[:5]}")
    return {"state": state, "param_groups": groups}


def _check_tensor(tensor: Tensor, param: Tensor, where: str) -> None:
    """State is per element of its parameter (exp_avg, momentum_buffer) or one number (step), floating."""
    if tuple(tensor.shape) not in ((), tuple(param.shape)) or not tensor.is_floating_point():
        raise StateError(
            f"{where} is a {tuple(tensor.shape)} {tensor.dtype} tensor; optimizer state of a {tuple(param.shape)} "
            "parameter is a floating tensor of that shape, or a scalar"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise StateError(f"{where} holds NaN or infinite values; the file is corrupted")
