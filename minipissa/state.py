"""save() / load(): one safetensors file per adapter, reloaded with no SVD, bit-exactly.

File layout (format version 1, see :mod:`minipissa.safefile` for the checksummed metadata):
    ``<module path>.A`` (r, in), ``.B`` (out, r): trained factors, in the adapter dtype;
    ``<module path>.A0`` (r, in), ``.B0`` (out, r): initial factors, in the decomposition dtype;
    ``optimizer:<module path>.A:<key>``: optimizer state tensors (optional).
The JSON blob holds per module rank, alpha, rslora, layout, shapes, base dtype and the init ``info``
(method, niter, oversample, seed, components, top singular values, ‖W‖_F, and fingerprints of
the original and the residual weight).

Loading rebuilds W_res = W - s·B0·A0 with the same function as apply() (no SVD), so the loaded
model's outputs equal the saved model's bit for bit on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import casts, optimizer_state, safefile
from .config import RECORDED
from .decompose import compute_dtype
from .fingerprint import fingerprint, same
from .layer import PiSSALinear, is_conv1d, weight_matrix
from .safefile import PathLike, StateError
from .sharded.dtensor import full_tensor, refuse_sharded, write_once
from .targets import is_supported
from .tree import Plan, build_layer, pissa_layers, replace_module, train_adapters_only

KIND = "adapter"
FACTORS = ("A", "B", "A0", "B0")
CONFIG_KEYS = ("rank", "alpha", "rslora", *RECORDED)


@dataclass
class ModuleRecord:
    """One adapted module as saved: hyperparameters, init info and the four factors (CPU tensors)."""

    name: str
    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    in_features: int
    out_features: int
    dropout: float
    base_dtype: str
    info: dict[str, Any]
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    A0: Tensor  # (r, in)
    B0: Tensor  # (out, r)

    def meta(self) -> dict[str, Any]:
        fields = ("rank", "alpha", "rslora", "fan_in_fan_out", "in_features", "out_features", "dropout", "base_dtype")
        return {k: getattr(self, k) for k in fields} | {"info": self.info}


def records(model: nn.Module) -> list[ModuleRecord]:
    """The adapter of every PiSSALinear in ``model`` (tensors gathered to plain CPU tensors, not copied
    where they already are plain CPU tensors: treat them as read-only)."""
    found = []
    for name, layer in pissa_layers(model):
        dropout = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        tensors = [full_tensor(t).cpu() for t in (layer.A, layer.B, layer.A0, layer.B0)]
        info = dict(layer.info)
        if "residual_fingerprint" not in info:  # apply() leaves it to here: one pass less per module at init
            residual = layer.residual_while_merged if layer.merged else layer.weight
            info["residual_fingerprint"] = fingerprint(full_tensor(cast(Tensor, residual)))
        found.append(
            ModuleRecord(
                name, layer.rank, layer.alpha, layer.rslora, layer.fan_in_fan_out, layer.in_features,
                layer.out_features, dropout, _base_dtype(layer), info,
                *tensors,
            )
        )  # fmt: skip
    if not found:
        raise StateError("minipissa: the model has no PiSSA layers; call minipissa.apply() or minipissa.load() first")
    return found


def _base_dtype(layer: PiSSALinear) -> str:
    """The dtype of the base weight the adapter was made from (the residual may have been cast since):
    reloading reproduces the model exactly only on a base of that dtype."""
    fp = layer.info.get("base_fingerprint")
    return fp["dtype"] if isinstance(fp, dict) else str(layer.weight.dtype).removeprefix("torch.")


def _config(recs: list[ModuleRecord]) -> dict[str, Any]:
    """The run's settings: the value every module shares, or "per-module"."""

    def value(rec: ModuleRecord, key: str) -> Any:
        return getattr(rec, key) if hasattr(rec, key) else rec.info.get(key)

    return {
        key: value(recs[0], key) if len({repr(value(r, key)) for r in recs}) == 1 else "per-module"
        for key in CONFIG_KEYS
    }


def save(model: nn.Module, path: PathLike, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write every adapter of ``model`` (A, B, A0, B0 + metadata) to one safetensors file, atomically.

    Args:
        optimizer: optionally also store its state for the A/B parameters (tensors in the file,
            hyperparameters in the metadata), restored by ``load(..., optimizer=)``.
    """
    recs = records(model)
    tensors = {f"{r.name}.{k}": getattr(r, k) for r in recs for k in FACTORS}
    payload: dict[str, Any] = {
        "minipissa_version": _version(),
        "config": _config(recs),
        "modules": {r.name: r.meta() for r in recs},
        "optimizer": None,
    }
    if optimizer is not None:
        params = {
            id(p): f"{name}.{k}" for name, layer in pissa_layers(model) for k, p in (("A", layer.A), ("B", layer.B))
        }
        opt_tensors, payload["optimizer"] = optimizer_state.pack(optimizer, params)
        tensors.update(opt_tensors)
    write_once(model, lambda: safefile.write(path, tensors, KIND, payload))  # rank 0 if sharded


def _version() -> str:
    from . import __version__

    return __version__


def read(path: PathLike) -> tuple[dict[str, Any], list[ModuleRecord], dict[str, Tensor]]:
    """The verified metadata, module records and optimizer tensors of an adapter file."""
    info, tensors = safefile.read(path, KIND)
    modules = info.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise StateError(f"minipissa: '{path}' describes no modules")
    recs = []
    for name, m in modules.items():
        missing = [f"{name}.{k}" for k in FACTORS if f"{name}.{k}" not in tensors]
        if missing:
            raise StateError(f"minipissa: '{path}': module '{name}' lacks tensors {missing}; the file is incomplete")
        try:
            factors: dict[str, Any] = {k: tensors.pop(f"{name}.{k}") for k in FACTORS}
            rec = ModuleRecord(name=name, **m, **factors)
        except TypeError as e:
            raise StateError(f"minipissa: '{path}': module '{name}' has malformed metadata ({e})") from None
        r, n_in, n_out = rec.rank, rec.in_features, rec.out_features
        shapes = [tuple(rec.A.shape), tuple(rec.B.shape), tuple(rec.A0.shape), tuple(rec.B0.shape)]
        if shapes != [(r, n_in), (n_out, r)] * 2 or rec.A.dtype != rec.B.dtype or rec.A0.dtype != rec.B0.dtype:
            raise StateError(
                f"minipissa: '{path}': module '{name}' has factors A, B, A0, B0 of shapes {shapes} "
                f"(dtypes {rec.A.dtype}, {rec.B.dtype}, {rec.A0.dtype}, {rec.B0.dtype}); expected "
                f"({r}, {n_in}) and ({n_out}, {r}), each pair in one dtype"
            )
        recs.append(rec)
    extra = [k for k in tensors if not k.startswith(optimizer_state.PREFIX)]
    if extra:
        raise StateError(f"minipissa: '{path}' holds tensors no module accounts for: {extra[:5]}")
    return info, recs, tensors


@dataclass
class _Loading:
    record: ModuleRecord
    module: nn.Module
    existing: bool  # already this PiSSALinear: only A and B are set


def _check_existing(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    same_setup = (layer.rank, layer.alpha, layer.rslora, layer.fan_in_fan_out, layer.in_features, layer.out_features)
    saved = (rec.rank, rec.alpha, rec.rslora, rec.fan_in_fan_out, rec.in_features, rec.out_features)
    a0, b0 = full_tensor(layer.A0).cpu(), full_tensor(layer.B0).cpu()
    if same_setup != saved or not (torch.equal(a0, rec.A0) and torch.equal(b0, rec.B0)):
        raise StateError(
            f"{where} already is a PiSSA layer with a different adapter (rank, alpha, layout or initial "
            "factors differ); load onto the plain base model instead"
        )
    if layer.merged:
        raise StateError(f"{where} is merged; call minipissa.unmerge(model) before loading A and B into it")
    if layer.A.dtype != rec.A.dtype:
        raise StateError(f"{where} has adapter dtype {layer.A.dtype}, the file {rec.A.dtype}; they must match")


def _check(model: nn.Module, rec: ModuleRecord, base: str, path: PathLike) -> _Loading:
    where = f"minipissa: module '{rec.name}'"
    try:
        module = model.get_submodule(rec.name)
    except AttributeError:
        raise StateError(
            f"{where} of '{path}' is not in the model; load onto the model the adapter was trained on "
            "(with the same module paths)"
        ) from None
    if isinstance(module, PiSSALinear):
        _check_existing(module, rec, where)
        return _Loading(rec, module, existing=True)
    if not is_supported(module):
        raise StateError(f"{where} is a {type(module).__name__}; the file adapts an nn.Linear or Conv1D there")
    weight = full_tensor(cast(Tensor, module.weight))
    if weight.is_meta:
        raise StateError(f"{where} has a meta weight; load the base model's weights before minipissa.load()")
    shape = tuple(weight_matrix(weight, rec.fan_in_fan_out).shape)
    if shape != (rec.out_features, rec.in_features) or (is_conv1d(module) and not rec.fan_in_fan_out):
        raise StateError(
            f"{where} has a {type(module).__name__} weight of shape {tuple(weight.shape)}; the adapter was saved "
            f"for (out, in) = ({rec.out_features}, {rec.in_features}) with fan_in_fan_out={rec.fan_in_fan_out}"
        )
    if str(weight.dtype).removeprefix("torch.") != rec.base_dtype:
        raise StateError(
            f"{where} has a {weight.dtype} weight; the adapter was saved on a {rec.base_dtype} base. Cast the model "
            f"to {rec.base_dtype} before loading (exact reload needs the same dtype)"
        )
    if compute_dtype(weight.dtype) != rec.A0.dtype:
        raise StateError(f"{where}: the file's A0 is {rec.A0.dtype}, expected {compute_dtype(weight.dtype)}")
    _check_fingerprint(weight, rec, base, where)
    return _Loading(rec, module, existing=False)


def _check_fingerprint(weight: Tensor, rec: ModuleRecord, base: str, where: str) -> None:
    wanted, other = ("base_fingerprint", "residual_fingerprint")
    if base == "residual":
        wanted, other = other, wanted
    if wanted not in rec.info:
        raise StateError(f"{where}: the file has no {wanted}; cannot check the base weights")
    actual = fingerprint(weight)
    if same(actual, rec.info[wanted]):
        return
    if other in rec.info and same(actual, rec.info[other]):
        hint = "base='residual'" if base == "original" else "base='original'"
        raise StateError(
            f"{where}: the weight is the {'residual' if base == 'original' else 'original'} weight, not the "
            f"{base} one; pass {hint} to minipissa.load()"
        )
    raise StateError(
        f"{where}: the weight does not match the {base} weight the adapter was saved with (fingerprint differs): "
        "a different base model or checkpoint, or already modified weights. Load onto the exact base model"
    )


def load(
    model: nn.Module,
    path: PathLike,
    *,
    base: str = "original",
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Load a saved adapter onto ``model`` in place (no SVD) and return it.

    Args:
        base: "original": the model holds the original pretrained weights (W_res = W - s·B0·A0 is
            rebuilt); "residual": it holds the residual weights written by :func:`save_residual`.
        optimizer: restore the optimizer state saved with ``save(..., optimizer=)``. Its parameters
            are the model's A/B, so the model must already have the adapter: ``load(model, path)``,
            create the optimizer, then ``load(model, path, optimizer=opt)``.

    Modules already adapted with the same initial factors only get A and B set. Everything (file,
    modules, shapes, dtypes, fingerprints, optimizer) is checked before the model is changed.

    Raises:
        StateError: with the module name and what to do; the model is then unchanged.
    """
    refuse_sharded(model, "load")
    if base not in ("original", "residual"):
        raise StateError(f"minipissa.load: base must be 'original' or 'residual', got {base!r}")
    info, recs, opt_tensors = read(path)
    loadings = [_check(model, rec, base, path) for rec in recs]
    in_file = {rec.name for rec in recs}
    stray = [name for name, _ in pissa_layers(model) if name not in in_file]
    if stray:
        raise StateError(f"minipissa: the model has PiSSA layers {stray[:5]} that '{path}' does not have")
    opt_state = None
    if optimizer is not None:
        if not all(loading.existing for loading in loadings):
            raise StateError(
                "minipissa.load(optimizer=): the optimizer must hold the model's A/B parameters, which exist "
                "only after loading: call load(model, path) first, then create the optimizer and call "
                "load(model, path, optimizer=opt)"
            )
        if not isinstance(info.get("optimizer"), dict):
            raise StateError(f"minipissa: '{path}' has no optimizer state; it was saved without save(..., optimizer=)")
        params = {f"{x.record.name}.{k}": getattr(x.module, k) for x in loadings for k in ("A", "B")}
        opt_state = optimizer_state.unpack(optimizer, params, opt_tensors, info["optimizer"], str(path))

    for loading in loadings:  # nothing below can fail on validated input
        rec = loading.record
        layer = cast(PiSSALinear, loading.module)
        if not loading.existing:
            plan = Plan(
                rec.name, loading.module, rec.rank, rec.alpha, rec.rslora, rec.fan_in_fan_out, rec.dropout, rec.A.dtype
            )
            device = plan.weight.device
            layer = build_layer(
                plan, rec.A0.to(device), rec.B0.to(device), rec.info, weight_is_residual=base == "residual"
            )
            replace_module(model, rec.name, layer)
        with torch.no_grad():
            layer.A.copy_(rec.A)
            layer.B.copy_(rec.B)
    train_adapters_only(model)
    casts.install(model, [layer for _, layer in pissa_layers(model)])
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return model
