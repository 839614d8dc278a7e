"""save() / load(): one safetensors file per adapter, reloaded with no SVD, bit-exactly.

The file (see :mod:`minipissa.records` for its records, :mod:`minipissa.safefile` for the checksummed
container) holds A, B, A0, B0 per module, the settings and init info in JSON, and optionally the optimizer
state of A and B. Loading rebuilds W_res = W - s·B0·A0 with the same function as apply() (no SVD), so the
loaded model's outputs equal the saved model's bit for bit on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.decompose import compute_dtype
from ..core.dtensor import full_tensor, refuse_sharded, write_once
from ..core.dtypes import dtype_name
from ..core.errors import PathLike, StateError
from ..core.fingerprint import fingerprint_later, hashes, read_all, same
from ..core.nf4 import NF4Weight
from ..core.qpissa import residual_nf4
from ..core.version import __version__
from ..core.weights import is_conv1d, lora_scaling, weight_matrix
from ..nn.layer import PiSSALinear
from ..nn.nf4_linear import NF4Linear
from ..plan import trained
from ..plan.install import finish, put, record_made
from ..plan.replaceable import refusal
from ..plan.targets import is_supported
from ..plan.tree import (
    Plan,
    adapted_layers,
    module_aliases,
    pissa_layers,
    unwrap,
)
from . import biases, optimizer_state, records, safefile, trained_modules
from .records import ModuleRecord

KIND = "adapter"


def save(model: nn.Module, path: PathLike, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write every adapter of ``model`` (A, B, A0, B0 + metadata) to one safetensors file, atomically; with it, the
    modules trained in full and each adapted layer's bias trained since apply (biases.py).

    Args:
        optimizer: optionally also store its state for the A/B parameters (tensors in the file,
            hyperparameters in the metadata), restored by ``load(..., optimizer=)``.
    """
    safefile.as_path(path)
    model = unwrap(model, "save")
    _check_optimizer(optimizer, "save")
    layers = adapted_layers(model, "save")
    recs = records_of(layers)
    tensors = {f"{r.name}.{k}": getattr(r, k) for r in recs for k in records.FACTORS}
    tensors |= {f"{r.name}.bias": r.bias for r in recs if r.bias is not None}
    payload: dict[str, Any] = {
        "minipissa_version": library_version(),
        "config": records.config_summary(recs),
        "modules": {r.name: r.meta() for r in recs},
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
        opt_tensors, payload["optimizer"] = optimizer_state.pack(optimizer, params)
        tensors.update(opt_tensors)
    records.check_readable(payload, tensors)  # what load() refuses, save() does not write
    write_once(model, lambda: safefile.write(path, tensors, KIND, payload))  # rank 0 if sharded


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


@dataclass
class _Loading:
    record: ModuleRecord
    module: nn.Module
    existing: bool  # already this PiSSALinear: only A and B are set
    residual: NF4Weight | None = None  # QPiSSA: the 4-bit residual, rebuilt and checked against the file


def _check_existing(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    same_setup = (layer.rank, layer.alpha, layer.rslora, layer.fan_in_fan_out, layer.in_features, layer.out_features)
    saved = (rec.rank, rec.alpha, rec.rslora, rec.fan_in_fan_out, rec.in_features, rec.out_features)
    a0, b0 = full_tensor(layer.A0).cpu(), full_tensor(layer.B0).cpu()
    if same_setup != saved or not (torch.equal(a0, rec.A0) and torch.equal(b0, rec.B0)):
        raise StateError(
            f"{where} already is a PiSSA layer with a different adapter (rank, alpha, layout or initial "
            "factors differ); load onto the plain base model instead"
        )
    _check_same_residual(layer, rec, where)
    if layer.merged:
        raise StateError(f"{where} is merged; call minipissa.unmerge(model) before loading A and B into it")
    if layer.A.dtype != rec.A.dtype:
        raise StateError(f"{where} has adapter dtype {layer.A.dtype}, the file {rec.A.dtype}; they must match")
    biases.check(layer.bias, rec, where, layer)


def _check_same_residual(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    """A and B go into an existing layer only if it holds the residual they were trained on: the same kind (4-bit or
    dense), made from the same base weight (its fingerprint: shape, dtype, digest), and for NF4 the same codes. The
    initial factors alone do not tell: QPiSSA and PiSSA of one weight share them, as LoRA inits of any two bases do."""
    kinds = ("a 4-bit (QPiSSA)", "a full-precision")
    mine, saved = kinds[not layer.quantized], kinds[rec.info["quantize"] is None]
    if mine != saved:
        raise StateError(
            f"{where} already is a PiSSA layer with {mine} residual; the file's adapter was trained on {saved} one. "
            "Load onto the plain base model instead (the residual is then rebuilt as the file says)"
        )
    made, want = layer.info.get("base_fingerprint"), rec.info["base_fingerprint"]
    made = made if isinstance(made, dict) else {}
    # Fingerprints of two format versions (an exact hash, a sampled digest) share only the shape and dtype.
    shared = ["shape", "dtype", *(k for k in ("hash", "sample_sha256") if k in made and k in want)]
    if any(made.get(k) != want[k] for k in shared):
        raise StateError(
            f"{where} already is a PiSSA layer made from another base weight than the file's adapter (their "
            "fingerprints differ: another checkpoint or dtype); load onto the plain base model it was trained on"
        )
    if isinstance(layer.weight, NF4Weight) and layer.weight.sha256() != rec.info["nf4_sha256"]:
        raise StateError(
            f"{where}: its 4-bit residual is not the one the file's adapter was trained on (sha256 differs)"
        )


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
    if problem := refusal(rec.name, module):  # what a PiSSA layer in its place would drop: hooks, own forward...
        raise StateError(problem)
    if isinstance(module, NF4Linear):
        return _check_nf4_base(module, rec, base, where)
    if not is_supported(module):
        raise StateError(f"{where} is a {type(module).__name__}; the file adapts an nn.Linear or Conv1D there")
    weight = full_tensor(cast(Tensor, module.weight))
    if weight.is_meta:
        raise StateError(f"{where} has a meta weight; load the base model's weights before minipissa.load()")
    shape = tuple(weight_matrix(weight, rec.fan_in_fan_out).shape)
    if shape != (rec.out_features, rec.in_features) or is_conv1d(module) != rec.fan_in_fan_out:
        raise StateError(
            f"{where} has a {type(module).__name__} weight of shape {tuple(weight.shape)}; the adapter was saved "
            f"for (out, in) = ({rec.out_features}, {rec.in_features}) with fan_in_fan_out={rec.fan_in_fan_out}"
        )
    # The original weight is in the base's dtype; a dense residual file holds the residual as it was when saved
    # (after a model.half(), in float16).
    dense_residual = base == "residual" and rec.info["quantize"] is None
    dtype, what = (
        (rec.info["residual_fingerprint"]["dtype"], "residual") if dense_residual else (rec.base_dtype, "base")
    )
    if dtype_name(weight.dtype) != dtype:
        raise StateError(
            f"{where} has a {weight.dtype} weight; the adapter was saved on a {dtype} {what}. Cast the model "
            f"to {dtype} before loading (exact reload needs the same dtype)"
        )
    if compute_dtype(weight.dtype) != rec.A0.dtype:
        raise StateError(
            f"{where}: the file's A0 is {rec.A0.dtype}, but a PiSSA layer on a {weight.dtype} weight holds "
            f"{compute_dtype(weight.dtype)} factors; load onto the original {rec.base_dtype} weights (base='original') "
            "and cast the model after loading, as it was cast after apply()"
        )
    if base == "original" and rec.info.get("residual_edited"):
        raise StateError(
            f"{where}: its residual was edited after apply() before it was saved (in place, quantized say; by a cast "
            "a reload cannot repeat; or its A0/B0 replaced, by load_state_dict say), so rebuilding it from the "
            "original weight would not give the saved model. Load with base='residual' onto the residual weights "
            "saved by minipissa.save_residual() from that model"
        )
    if rec.info["quantize"] is not None and base == "residual":
        raise StateError(
            f"{where} has a full-precision weight, but the adapter's residual is 4-bit (NF4): put it in place with "
            "minipissa.load_residual() first, or load onto the original weights with base='original'"
        )
    _check_fingerprint(weight, rec, base, where)
    biases.check(cast(Tensor | None, module.bias), rec, where)
    if rec.info["quantize"] is None:
        return _Loading(rec, module, existing=False)
    with torch.no_grad():
        a0, b0 = rec.A0.to(weight.device), rec.B0.to(weight.device)
        residual = residual_nf4(weight, a0, b0, lora_scaling(rec.alpha, rec.rank, rec.rslora), rec.fan_in_fan_out)
    if residual.sha256() != rec.info["nf4_sha256"]:
        raise StateError(
            f"{where}: its 4-bit residual, rebuilt from the original weight, has other codes than the saved one "
            "(re-quantizing is bit-reproducible on one device and GEMM order only: another device or library "
            "rounds W - s·B0·A0 differently, and a few values land in other 4-bit buckets). Load on the device "
            "kind that saved it"
        )
    return _Loading(rec, module, existing=False, residual=residual)


def _named(model: nn.Module, name: str, params: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    own = dict(model.get_submodule(name).named_parameters())
    return [(p, own[p]) for p in params]


def _check_nf4_base(module: NF4Linear, rec: ModuleRecord, base: str, where: str) -> _Loading:
    """A 4-bit residual put in place by load_residual(): the QPiSSA adapter saved with those very codes."""
    if base != "residual" or rec.info["quantize"] is None:
        raise StateError(
            f"{where} holds a 4-bit residual (minipissa.load_residual); load the QPiSSA adapter saved with it, with "
            "base='residual'"
        )
    stored = (rec.in_features, rec.out_features) if rec.fan_in_fan_out else (rec.out_features, rec.in_features)
    if module.weight.shape != stored or module.fan_in_fan_out != rec.fan_in_fan_out:
        raise StateError(f"{where}: its 4-bit residual is {module.weight.shape}, the adapter's {stored}")
    if module.weight.sha256() != rec.info["nf4_sha256"]:
        raise StateError(f"{where}: its 4-bit residual is not the one the adapter was saved with (sha256 differs)")
    biases.check(module.bias, rec, where)
    return _Loading(rec, module, existing=False, residual=module.weight)


def _check_fingerprint(weight: Tensor, rec: ModuleRecord, base: str, where: str) -> None:
    wanted, other = ("base_fingerprint", "residual_fingerprint")
    if base == "residual":
        wanted, other = other, wanted
    if same(rec.info[wanted], weight):
        return
    if same(rec.info[other], weight):
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
    info, recs, opt_tensors = read(path)
    full, before_training = trained_modules.unpack(info.get("trained"), opt_tensors, f"minipissa: '{path}'")
    trained_modules.check(model, full, [rec.name for rec in recs], f"minipissa: '{path}'")
    loadings = [_check(model, rec, base, path) for rec in recs]
    in_file = {rec.name for rec in recs}
    stray = [name for name, _ in pissa_layers(model) if name not in in_file]
    if stray:
        raise StateError(f"minipissa: the model has PiSSA layers {stray[:5]} that '{path}' does not have")
    if not all(loading.existing for loading in loadings):  # new layers: refused under DDP (see unwrap)
        unwrap(outer, "load", adds_parameters=True)
    opt_state = None
    if optimizer is not None:
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
        opt_state = optimizer_state.unpack(optimizer, params, opt_tensors, info["optimizer"], str(path))

    built: list[tuple[PiSSALinear, Tensor, Tensor]] = []  # with the A0 and B0 it was built from, to hash them
    aliases = module_aliases(model)
    # What every layer of the model records from now on: the file's modules trained in full (the model's own
    # were checked to be among them) with their values before training, and the init time of the layers kept.
    run = trained.Run(tuple(sorted(full)), before_training, trained.init_seconds(model))
    for loading in loadings:  # validated: only an out-of-memory or an interrupt can stop this
        rec = loading.record
        layer = cast(PiSSALinear, loading.module)
        if not loading.existing:
            residual, module = loading.residual, loading.module
            module = module.as_base() if isinstance(module, NF4Linear) else module
            plan = Plan(rec.name, module, rec)
            device = plan.weight.device if residual is None else residual.codes.device
            a0, b0 = rec.A0.to(device), rec.B0.to(device)
            from_file = base == "residual" and residual is None
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
    trained_modules.restore(model, full)
    finish(model, "load")
    for loading in loadings:  # a bias trained when saved trains on, as the adapter does
        if loading.record.bias is not None:
            cast(PiSSALinear, model.get_submodule(loading.record.name)).bias.requires_grad_(True)  # type: ignore[union-attr]
    if optimizer is not None and opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return outer
