"""An optimizer's state for the adapter parameters as tensors + JSON, so training resumes without pickle.

Tensor state (e.g. AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``) goes into the file under
``optimizer:<param name>:<key>``; scalars and the param groups' hyperparameters into the metadata, but for tensor
hyperparameters (a capturable optimizer's ``lr=torch.tensor(1e-4)``; format version 4), which go into the file as
``optimizer:param_groups:<group>:<n>``, bit for bit, their places in the metadata listed under the group's
``"tensors"``. Tuples (``betas``) come back as tuples, lists as lists.
Parameters are identified by name (``<module path>.A`` / ``.B``), never by position, so a
resumed optimizer may list them in another order.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import torch
from torch import Tensor

from ..core.checks import Check
from ..core.dtensor import full_tensor
from ..core.errors import StateError

PREFIX = "optimizer:"
SCALARS = (bool, int, float, str, type(None))
GROUP_KEYS = ("params", "hyper", "tuples", "tensors")


def pack(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of ``optimizer``'s state; ``names`` maps id(parameter) to its name."""
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
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
        encoded, places = _encode(hyper, len(groups), tensors)
        tuples = sorted(k for k, v in hyper.items() if isinstance(v, tuple))
        groups.append({"params": group_names, "hyper": encoded, "tuples": tuples, "tensors": places})
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": state}


def _encode(hyper: dict[str, Any], group: int, tensors: dict[str, Tensor]) -> tuple[dict[str, Any], list[list[Any]]]:
    """The JSON of one param group's hyperparameters, and the places ([key] or [key, index]) of its tensors, which
    go into ``tensors`` as ``optimizer:param_groups:<group>:<n>`` (null in the JSON); a named error for any value
    that is not a finite number, str, bool, None or tensor, or a tuple or list of them."""
    places: list[list[Any]] = []

    def one(value: Any, place: list[Any]) -> Any:
        if isinstance(value, Tensor):
            tensors[f"{PREFIX}param_groups:{group}:{len(places)}"] = full_tensor(value.detach()).cpu()
            places.append(place)
            return None
        if (isinstance(value, float) and not math.isfinite(value)) or not isinstance(value, SCALARS):
            raise StateError(
                f"minipissa.save(optimizer=): param group {group}'s hyperparameter {place[0]!r} holds {value!r:.60}; "
                "the file stores finite numbers, strings, bools, None and tensors, or tuples and lists of them"
            )
        return value

    encoded = {}
    for key, value in hyper.items():
        if not isinstance(key, str):
            raise StateError(f"minipissa.save(optimizer=): param group {group} has a hyperparameter named {key!r}")
        many = isinstance(value, (tuple, list))
        encoded[key] = [one(v, [key, j]) for j, v in enumerate(value)] if many else one(value, [key])
    return encoded, places


def check_meta(meta: dict[str, Any], check: Check) -> None:
    """Fails ``check`` (the file's) unless ``meta`` has the structure :func:`pack` writes (values are checked by
    :func:`unpack`)."""

    def fail(what: str) -> NoReturn:
        check.malformed(f"the optimizer state's {what}")

    if set(meta) != {"class", "param_groups", "state"} or not isinstance(meta["class"], str):
        fail("header")
    groups, state = meta["param_groups"], meta["state"]
    if not isinstance(groups, list) or not isinstance(state, dict):
        fail("layout")
    for group in groups:
        # "tensors": format version 4; older files have none.
        if not (isinstance(group, dict) and {"params", "hyper", "tuples"} <= set(group) <= {*GROUP_KEYS}):
            fail("param group")
        if not (_strings(group["params"]) and _strings(group["tuples"]) and isinstance(group["hyper"], dict)):
            fail("param group")
        if not set(group["tuples"]) <= set(group["hyper"]):
            fail("param group's tuples")
        for key, value in group["hyper"].items():
            ok = isinstance(value, SCALARS) or (isinstance(value, list) and all(isinstance(v, SCALARS) for v in value))
            if not ok or (key in group["tuples"] and not isinstance(value, list)):
                fail(f"hyperparameter '{key}'")
        places = group.get("tensors", [])
        if not (isinstance(places, list) and all(_place(group["hyper"], p) for p in places)):
            fail("param group's tensors")
        if len({json.dumps(p) for p in places}) != len(places):
            fail("param group's tensors")
    for name, entry in state.items():
        if not (isinstance(entry, dict) and set(entry) == {"scalars", "tensors"} and _strings(entry["tensors"])):
            fail(f"state of '{name}'")
        if not (isinstance(entry["scalars"], dict) and all(isinstance(v, SCALARS) for v in entry["scalars"].values())):
            fail(f"state of '{name}'")


def _place(hyper: dict[str, Any], place: Any) -> bool:
    """Whether ``place`` is [key] or [key, index] of a null in ``hyper`` (where :func:`_encode` put a tensor)."""
    if not (isinstance(place, list) and place and isinstance(place[0], str) and place[0] in hyper):
        return False
    value = hyper[place[0]]
    if len(place) == 1:
        return value is None
    index = place[1]
    ok = len(place) == 2 and isinstance(value, list) and type(index) is int and 0 <= index < len(value)
    return ok and value[index] is None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_MISFIT = object()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fit(saved: Any, live: Any) -> Any:
    """The file's value of a hyperparameter in the kind the optimizer has (``live``): a tensor lr (capturable
    optimizers) stays a tensor on its device, a number a number...; :data:`_MISFIT` where it cannot stand there."""
    if isinstance(live, Tensor):
        if isinstance(saved, Tensor) and saved.shape == live.shape or _number(saved) and live.ndim == 0:
            value = saved if isinstance(saved, Tensor) else torch.tensor(saved, dtype=live.dtype)
            return value.to(device=live.device, dtype=live.dtype)
        return _MISFIT
    if isinstance(saved, Tensor):  # a tensor saved where the optimizer now has a number
        if saved.ndim != 0 or not saved.is_floating_point() or not _number(live):
            return _MISFIT
        saved = saved.item()
    if isinstance(live, bool) or live is None:  # flags such as foreach, fused: None means "default"
        return saved if saved is None or isinstance(saved, bool) else _MISFIT
    if isinstance(live, str):
        return saved if isinstance(saved, str) else _MISFIT
    if _number(live):
        return saved if _number(saved) and math.isfinite(saved) else _MISFIT
    if isinstance(live, (tuple, list)):
        if not (isinstance(saved, (tuple, list)) and len(saved) == len(live)):
            return _MISFIT
        values = [_fit(s, v) for s, v in zip(saved, live, strict=True)]
        return _MISFIT if any(v is _MISFIT for v in values) else type(saved)(values)
    return saved  # anything else: load_state_dict handles it


def _hyper(saved: dict[str, Any], group: int, tensors: dict[str, Tensor], used: set[str], where: str) -> dict[str, Any]:
    """One saved param group's hyperparameters with their tensors put back in place (checked finite) and its tuples
    made tuples again; the tensors' names go into ``used``."""
    hyper = {k: list(v) if isinstance(v, list) else v for k, v in saved["hyper"].items()}
    for n, place in enumerate(saved.get("tensors", [])):
        key = f"{PREFIX}param_groups:{group}:{n}"
        if key not in tensors:
            raise StateError(
                f"{where}: the tensor of param group {group}'s {place[0]!r} is missing; the file is incomplete"
            )
        value = tensors[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise StateError(f"{where}: '{key}' holds NaN or infinite values; the file is corrupted")
        used.add(key)
        if len(place) == 1:
            hyper[place[0]] = value
        else:
            hyper[place[0]][place[1]] = value
    return hyper | {k: tuple(hyper[k]) for k in saved["tuples"]}


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
    used: set[str] = set()
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    index = 0
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        found = [by_id.get(id(p)) for p in group["params"]]
        names = [n for n in found if n is not None]
        if len(names) != len(found):
            raise StateError(f"{where}: param group {i} holds parameters that are not the model's PiSSA A/B")
        if sorted(names) != sorted(saved["params"]):
            raise StateError(f"{where}: param group {i} holds {sorted(names)}, the file {saved['params']}")
        hyper = _hyper(saved, i, tensors, used, where)
        hyper |= {k: _fit(v, group[k]) for k, v in hyper.items() if k in group}
        wrong = [k for k, v in hyper.items() if v is _MISFIT]
        if wrong:
            raise StateError(
                f"{where}: param group {i}'s {wrong[:3]} do not fit the optimizer's (e.g. a str lr, or a tensor lr "
                "of another shape); create the optimizer as it was when saved"
            )
        ids = list(range(index, index + len(names)))
        index += len(names)
        for i, name in zip(ids, names, strict=True):
            entry = meta["state"].get(name)
            if entry is not None:
                state[i] = _param_state(entry, name, params[name], tensors, used, where)
        groups.append(hyper | {"params": ids})
    unused = sorted(set(tensors) - used)
    if unused:
        raise StateError(f"{where}: the file holds optimizer tensors no parameter accounts for: {unused[:5]}")
    return {"state": state, "param_groups": groups}


def _param_state(
    entry: dict[str, Any], name: str, param: Tensor, tensors: dict[str, Tensor], used: set[str], where: str
) -> dict[str, Any]:
    """The saved state of parameter ``name`` (its scalars and its checked tensors); the tensors' names go into
    ``used``."""
    keys = [f"{PREFIX}{name}:{k}" for k in entry["tensors"]]
    if any(k not in tensors for k in keys):
        raise StateError(f"{where}: optimizer tensors of '{name}' are missing; the file is incomplete")
    for key in keys:
        _check_tensor(tensors[key], param, f"{where}: '{key}'")
    used.update(keys)
    return entry["scalars"] | {k: tensors[key] for k, key in zip(entry["tensors"], keys, strict=True)}


def _check_tensor(tensor: Tensor, param: Tensor, where: str) -> None:
    """State is per element of its parameter (exp_avg, momentum_buffer) or one number (step), floating."""
    if tuple(tensor.shape) not in ((), tuple(param.shape)) or not tensor.is_floating_point():
        raise StateError(
            f"{where} is a {tuple(tensor.shape)} {tensor.dtype} tensor; optimizer state of a {tuple(param.shape)} "
            "parameter is a floating tensor of that shape, or a scalar"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise StateError(f"{where} holds NaN or infinite values; the file is corrupted")
