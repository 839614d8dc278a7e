"""save() / load(): one safetensors file per adapter, reloaded with no SVD, bit-exactly.

The file (see :mod:`minipissa.records` for its records, :mod:`minipissa.safefile` for the checksummed
container) holds A, B, A0, B0 per module, the settings and init info in JSON, and optionally the optimizer
state of A and B. Loading rebuilds W_res = W - s·B0·A0 with the same function as apply() (no SVD), so the
loaded model's outputs equal the saved model's bit for bit on the same device and dtype.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.dtensor import full_tensor, refuse_sharded, write_once
from ..core.errors import PathLike, StateError
from ..core.fingerprint import fingerprint_later, hashes, read_all
from ..core.version import __version__
from ..nn import adapters as per_layer
from ..nn.layer import PiSSALinear
from ..nn.nf4_linear import NF4Linear
from ..plan import named, trained
from ..plan.install import finish, put, record_made
from ..plan.tree import (
    Plan,
    adapted_layers,
    module_aliases,
    unwrap,
)
from . import biases, optimizer_state, records, safefile, trained_modules
from .adapter_fit import Loading, fit
from .records import ModuleRecord

KIND = "adapter"


def save(
    model: nn.Module, path: PathLike, *, optimizer: torch.optim.Optimizer | None = None, name: str | None = None
) -> None:
    """Write an adapter of ``model`` (A, B, A0, B0 + metadata) to one safetensors file, atomically; with it, the
    modules trained in full and each adapted layer's bias trained since apply (biases.py).

    Args:
        optimizer: optionally also store its state for the A/B parameters (tensors in the file,
            hyperparameters in the metadata), restored by ``load(..., optimizer=)``.
        name: which adapter (default: the active one). The file is the one a model with that adapter alone
            would write: loaded onto the base model, it gives that adapter.
    """
    safefile.as_path(path)
    model = unwrap(model, "save")
    _check_optimizer(optimizer, "save")
    adapted_layers(model, "save")
    adapter = named.known(model, named.target(model, name, "save"), "save")
    with named.switched(model, adapter, "save") as layers:
        _save(model, layers, path, optimizer, adapter)


def _save(
    model: nn.Module, layers: list[tuple[str, PiSSALinear]], path: PathLike, optimizer: torch.optim.Optimizer | None,
    adapter: str,
) -> None:  # fmt: skip
    """:func:`save` of the layers that hold ``adapter`` (as their own adapter, for the length of it)."""
    recs = records_of(layers)
    tensors = {f"{r.name}.{k}": getattr(r, k) for r in recs for k in records.FACTORS}
    tensors |= {f"{r.name}.bias": r.bias for r in recs if r.bias is not None}
    payload: dict[str, Any] = {
        "minipissa_version": library_version(),
        "config": records.config_summary(recs),
        "modules": {r.name: r.meta() for r in recs},
        "module_order": [r.name for r in recs],  # the blob's keys are sorted: the model's order, for inspect
        "optimizer": None,
    }
    full_tensors, payload["trained"] = trained_modules.pack(model)
    tensors.update(full_tensors)
    if optimizer is not None:
        params = {id(p): f"{name}.{k}" for name, layer in layers for k, p in (("A", layer.A), ("B", layer.B))}
        params |= {
            id(layer.bias): f"{r.name}.bias" for (_, layer), r in zip(layers, recs, strict=True) if r.bias is not None
        }
        params |= {id(p): name for name, p in _trained_parameters(model).items()}
        named.refuse_other_optimizer(model, optimizer, params, adapter)
        opt_tensors, payload["optimizer"] = optimizer_state.pack(optimizer, params)
        tensors.update(opt_tensors)
    records.check_readable(payload, tensors)  # what load() refuses, save() does not write
    write_once(model, lambda: safefile.write(path, tensors, KIND, payload))  # rank 0 if sharded


def adapter_records(
    model: nn.Module, name: str | None, what: str
) -> tuple[list[ModuleRecord], dict[str, Tensor], dict[str, list[str]]]:
    """The records of adapter ``name`` (default: the active one) of the bare ``model``, as :func:`save` makes them,
    and its modules trained in full (tensors, metadata: trained_modules.pack)."""
    adapted_layers(model, what)
    adapter = named.known(model, named.target(model, name, what), what)
    with named.switched(model, adapter, what) as layers:
        return records_of(layers), *trained_modules.pack(model)


def _trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the modules trained in full, by their name in the file."""
    return {
        f"{trained_modules.PREFIX}{name}.{p}": param
        for name in trained.names(model)
        for p, param in model.get_submodule(name).named_parameters()
    }


def _check_optimizer(optimizer: object, what: str) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"minipissa.{what}: optimizer must be a torch.optim.Optimizer or None, got {optimizer!r:.60}")


def records_of(layers: list[tuple[str, PiSSALinear]]) -> list[ModuleRecord]:
    """The records of live layers, each with its residual's fingerprint and the hashes of its A0 and B0 as they are
    now (hashed on the residual's device; one read-back per device), and its bias if it was trained since apply
    (biases.py)."""
    residuals = [full_tensor(layer.stored_residual()) for _, layer in layers]
    queued = [fingerprint_later(r) for r in residuals]
    queued += [fingerprint_later(full_tensor(layer.bias)) for _, layer in layers if layer.bias is not None]
    prints = read_all(queued)
    factors = [t.to(r.device, non_blocking=True) for (_, layer), r in zip(layers, residuals, strict=True)
               for t in (layer.A0, layer.B0)]  # fmt: skip
    digests = hashes(factors)
    recs = [
        records.from_layer(name, layer, p, (digests[2 * i], digests[2 * i + 1]))
        for i, ((name, layer), p) in enumerate(zip(layers, prints[: len(layers)], strict=True))
    ]
    return biases.keep_trained(layers, recs, prints[len(layers) :])


def library_version() -> str:
    return __version__


def read(path: PathLike) -> tuple[dict[str, Any], list[ModuleRecord], dict[str, Tensor]]:
    """The verified metadata, module records (every field checked) and optimizer tensors of an adapter file."""
    info, tensors = safefile.read(path, KIND)
    recs, opt_tensors = records.parse(info, tensors, f"minipissa: '{path}'")
    return info, recs, opt_tensors


def _named(model: nn.Module, name: str, params: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    own = dict(model.get_submodule(name).named_parameters())
    return [(p, own[p]) for p in params]


def load(
    model: nn.Module,
    path: PathLike,
    *,
    base: str = "original",
    optimizer: torch.optim.Optimizer | None = None,
    name: str | None = None,
) -> nn.Module:
    """Load a saved adapter onto ``model`` in place (no SVD) and return it.

    Args:
        base: "original": the model holds the original pretrained weights (W_res = W - s·B0·A0 is
            rebuilt); "residual": it holds the residual weights written by :func:`save_residual`.
        optimizer: restore the optimizer state saved with ``save(..., optimizer=)``. Its parameters
            are the model's A/B, so the model must already have the adapter: ``load(model, path)``,
            create the optimizer, then ``load(model, path, optimizer=opt)``.
        name: the adapter to load into (default: the active one; "default" on a model without adapters). A name
            the model has not got adds the file as one more adapter (nn/adapters.py), without changing the others
            or which one is active (:func:`minipissa.set_adapter`).

    Modules already adapted with the same initial factors only get A and B set. Everything (every field
    of the file, modules, shapes, dtypes, fingerprints, optimizer) is checked before the model is changed.

    Raises:
        StateError: with the module name and what to do; the model is then unchanged.
    """
    refuse_sharded(model, "load")
    outer, model = model, unwrap(model, "load")
    _check_optimizer(optimizer, "load")
    if base not in ("original", "residual"):
        raise StateError(f"minipissa.load: base must be 'original' or 'residual', got {base!r}")
    adapter = named.target(model, name, "load")
    info, recs, opt_tensors = read(path)
    return put_records(outer, model, (info, recs, opt_tensors), path, base=base, optimizer=optimizer, name=adapter)


def put_records(
    outer: nn.Module,
    model: nn.Module,
    content: tuple[dict[str, Any], list[ModuleRecord], dict[str, Tensor]],
    path: PathLike,
    *,
    base: str,
    optimizer: torch.optim.Optimizer | None,
    name: str,
) -> nn.Module:
    """:func:`load` after the file is read (``content``: its metadata, records and other tensors), into adapter
    ``name`` of the bare ``model`` (``outer``: as given, maybe wrapped); also the road of a LoRA (interop)."""
    info, recs, opt_tensors = content
    full, before_training = trained_modules.unpack(info.get("trained"), opt_tensors, f"minipissa: '{path}'")
    trained_modules.check(model, full, [rec.name for rec in recs], f"minipissa: '{path}'")
    was_active = named.active(model)
    if set(named.adapter_names(model)) - {name}:  # the model will hold several adapters
        named.refuse_several(model, "load", bool(full), any(rec.bias is not None for rec in recs))
    with named.switched(model, name, "load") as held:
        loadings = [fit(model, rec, base, path, name) for rec in recs]
        in_file = {rec.name for rec in recs}
        stray = [n for n, _ in held if n not in in_file]
        if stray:
            raise StateError(f"minipissa: the model has PiSSA layers {stray[:5]} that '{path}' does not have")
        if not all(loading.existing for loading in loadings):  # new layers: refused under DDP (see unwrap)
            unwrap(outer, "load", adds_parameters=True)
        opt_state = (
            None if optimizer is None else _optimizer_state(model, optimizer, loadings, full, info, opt_tensors, path)
        )
        # What every layer of the model records from now on: the file's modules trained in full (the model's own
        # were checked to be among them) with their values before training, and the init time of the layers kept.
        run = trained.Run(tuple(sorted(full)), before_training, trained.init_seconds(model))
        new = _install(model, loadings, base == "residual", run, name)
    trained_modules.restore(model, full)
    finish(model, "load")
    named.adopt(model, new, name, was_active)
    for loading in loadings:  # a bias trained when saved trains on, as the adapter does
        if loading.record.bias is not None:
            cast(PiSSALinear, model.get_submodule(loading.record.name)).bias.requires_grad_(True)  # type: ignore[union-attr]
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return outer


def _optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loadings: list[Loading],
    full: dict[str, trained.Params],
    info: dict[str, Any],
    opt_tensors: dict[str, Tensor],
    path: PathLike,
) -> dict[str, Any]:
    """The file's optimizer state for ``optimizer``, over the model's A/B (and trained biases and modules trained
    in full) by their names in the file; every part checked (optimizer_state.unpack)."""
    if not all(loading.existing for loading in loadings):
        raise StateError(
            "minipissa.load(optimizer=): the optimizer must hold the model's A/B parameters, which exist "
            "only after loading: call load(model, path) first, then create the optimizer and call "
            "load(model, path, optimizer=opt)"
        )
    if info.get("optimizer") is None:
        raise StateError(f"minipissa: '{path}' has no optimizer state; it was saved without save(..., optimizer=)")
    params = {f"{x.record.name}.{k}": getattr(x.module, k) for x in loadings for k in ("A", "B")}
    params |= {f"{x.record.name}.bias": x.module.bias for x in loadings if x.record.bias is not None}
    params |= {
        f"{trained_modules.PREFIX}{name}.{p}": t for name, ps in full.items() for p, t in _named(model, name, ps)
    }
    return optimizer_state.unpack(optimizer, params, opt_tensors, info["optimizer"], str(path))


def _install(
    model: nn.Module, loadings: list[Loading], on_residual: bool, run: trained.Run, name: str
) -> list[PiSSALinear]:
    """Put the checked records in: a PiSSA layer built for each new one (through the one installer, plan/install.py;
    ``on_residual``: its weight already is W_res), adapter ``name`` added beside the others of an existing layer,
    then every layer's A, B and trained bias set. Returns the new layers."""
    built: list[tuple[PiSSALinear, Tensor, Tensor]] = []  # with the A0 and B0 it was built from, to hash them
    aliases = module_aliases(model)
    adding = [loading for loading in loadings if loading.adds]
    digests = hashes([t for loading in adding for t in (loading.record.A0, loading.record.B0)])
    for i, loading in enumerate(adding):  # beside the layer's own adapters: frozen, its residual corrected
        rec = loading.record
        per_layer.add(
            cast(PiSSALinear, loading.module), name, (rec.A, rec.B, rec.A0, rec.B0), alpha=rec.alpha,
            rslora=rec.rslora, dropout=rec.dropout, info=dict(rec.info), factors=(digests[2 * i], digests[2 * i + 1]),
            origin=trained.Origin(rec.name, run),
        )  # fmt: skip
    for loading in loadings:  # validated: only an out-of-memory or an interrupt can stop this
        rec = loading.record
        layer = cast(PiSSALinear, loading.module)
        if loading.adds:
            continue
        if not loading.existing:
            residual, module = loading.residual, loading.module
            module = module.as_base() if isinstance(module, NF4Linear) else module
            plan = Plan(rec.name, module, rec)
            device = plan.weight.device if residual is None else residual.codes.device
            a0, b0 = rec.A0.to(device), rec.B0.to(device)
            from_file = on_residual and residual is None
            initial = (rec.A0.clone(), rec.B0.clone())  # in host memory already: no transfer back
            layer = put(model, plan, a0, b0, dict(rec.info), run, aliases, weight_is_residual=from_file,
                        residual=residual, initial=initial)  # fmt: skip
            built.append((layer, a0, b0))
        layer.origin = trained.Origin(rec.name, run)
        with torch.no_grad():
            layer.A.copy_(rec.A)
            layer.B.copy_(rec.B)
        biases.restore(layer, rec)
    # The residuals as rebuilt here (another device may round them differently from the saving one), and A0 and
    # B0: what a later save() compares against to tell an edited residual.
    prints = read_all([fingerprint_later(layer.stored_residual()) for layer, _, _ in built])
    record_made([layer for layer, _, _ in built], prints, [(a0, b0) for _, a0, b0 in built])
    return [layer for layer, _, _ in built]
