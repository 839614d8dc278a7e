"""The one installer: the only place that puts PiSSA layers into a model. apply(), load() and import_peft() end
here (build each layer from its initial factors, replace the module, adopt it under FSDP2, fingerprint the residuals,
freeze all but the adapters, install the shared casts)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, cast

import torch
from torch import Tensor, nn

from ..core.dtensor import full_tensor, is_dtensor
from ..core.fingerprint import Pending, describe, fingerprint_later, hashes, is_finite, read_all
from ..core.host import host_copies
from ..core.made import Made
from ..core.nf4 import NF4Weight
from ..core.qpissa import ERRORS, quantize_residual
from ..nn import casts
from ..nn.layer import PiSSALinear
from . import trained
from .config import InitConfig
from .factors import (
    Factors,
    factors,
    nonfinite_factors,
    overflowing_residuals,
    refuse_overflow,
)
from .progress import progress_reporter
from .sharded.factors import check_finite_shards, check_layouts, sharded_factors
from .sharded.fsdp import FsdpAdoption
from .tree import (
    Plan,
    build_layer,
    module_aliases,
    pissa_layers,
    replace_module,
    train_adapters_only,
)


def adapt(
    model: nn.Module,
    plans: Sequence[Plan],
    cfg: InitConfig,
    progress: bool | Callable[[int, int], None] = False,
    given: Sequence[Factors] | None = None,
    run: trained.Run | None = None,
) -> None:
    """apply() after planning, in steps such that an error before the last leaves the model as it was:

    1. every target weight is fingerprinted (one pass) and every initial factor computed (the factor stream);
    2. the fingerprints are read back (once) and a weight holding NaN or inf refused, as are non-finite factors;
    3. each layer is built and put in place, its weight freed as the loop goes; then only A and B train.

    Only an out-of-memory or an interrupt in step 3 stops it midway: the error then names the modules
    already adapted (each an exact PiSSA layer) and those left as they were. Sharded weights (FSDP2) are
    checked in steps 1-2 alike, but their residuals are written into the shards as their factors come.
    ``given``: the initial factors made elsewhere (an imported PEFT adapter), one per plan, in place of the stream.
    ``run``: what each new layer records of this run (:class:`~minipissa.trained.Run`: modules trained in full...).
    """
    run = trained.Run() if run is None else run
    sharded = [p for p in plans if is_dtensor(p.weight)]
    plain = [p for p in plans if not is_dtensor(p.weight)]
    fsdp = _adopt_sharded(model, sharded, cfg)
    queued = [fingerprint_later(p.weight) for p in plain]  # read back once the factors are queued too
    # The biases are part of the base: fingerprinted (every rank alike, in plan order), so that load() can tell a
    # base with other biases and save() a bias trained since
    biased = [p for p in plans if p.module.bias is not None]
    queued += [fingerprint_later(full_tensor(cast(Tensor, p.module.bias))) for p in biased]
    report_progress = progress_reporter(progress, len(plans))
    items, base_print, bias_prints = _checked_factors(plain, biased, queued, cfg, given, report_progress)
    # Every A0 and B0 to host memory, queued now to run beside the loop below (not two syncs per layer inside it).
    on_host = host_copies([t for item in items for t in (item.a0, item.b0)], wait=False)
    initial = {id(item): (on_host[2 * i], on_host[2 * i + 1]) for i, item in enumerate(items)}
    stream = itertools.chain(sharded_factors(sharded, cfg), items)
    built, residual_prints, quant_errors = _put_all(
        model, plans, stream, cfg, run, initial, fsdp, lambda done: report_progress(len(items) + done)
    )
    for device in {item.a0.device for item in items if item.a0.is_cuda}:  # the host copies of A0 and B0 have landed
        torch.cuda.current_stream(device).synchronize()
    for layer, item in built:
        layer.info.update(describe(item.sigma, item.base_print or base_print[item.plan.name]))
        layer.info["bias_fingerprint"] = bias_prints.get(item.plan.name)
    made = [layer for layer, _ in built]
    record_made(made, read_all(residual_prints), [(item.a0, item.b0) for _, item in built])  # what the host copies hold
    for (layer, _), errors in zip(built, quant_errors, strict=False):  # one per layer when quantized
        layer.info.update(zip(ERRORS, errors.tolist(), strict=True))
    finish(model, "apply")


def _adopt_sharded(model: nn.Module, sharded: Sequence[Plan], cfg: InitConfig) -> FsdpAdoption | None:
    """FSDP2 / DTensor weights (each factored on one owner rank, :mod:`.sharded.factors`) checked before anything
    changes: a supported layout, finite values; their FSDP adoption prepared. None if there are none."""
    if not sharded:
        return None
    if cfg.quantize:
        raise ValueError(
            f"minipissa.apply: quantize='nf4' on FSDP2-sharded weights ({sharded[0].name}, ...) is not supported; "
            "apply before fully_shard (the 4-bit codes then stay whole on each rank), or leave quantize=None"
        )
    check_layouts(sharded)
    fsdp = FsdpAdoption(model, sharded)
    check_finite_shards(sharded)
    return fsdp


def _checked_factors(
    plans: Sequence[Plan],
    biased: Sequence[Plan],
    queued: list[Pending],
    cfg: InitConfig,
    given: Sequence[Factors] | None,
    report_progress: Callable[[int], None],
) -> tuple[list[Factors], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Steps 1-2 of :func:`adapt` for the plain weights ``plans``: their factors (the stream, or ``given``), and the
    fingerprints ``queued`` (of ``plans``' weights, then of ``biased``'s biases) read back; a named error for a
    weight or bias that is not finite or too large, for non-finite factors and for an overflowing residual.
    Returns the factors and the fingerprints of the weights and of the biases, by module name."""
    items = []
    try:
        for item in factors(plans, cfg) if given is None else given:
            items.append(item)
            report_progress(len(items))
    except Exception:
        _refuse_unusable(plans, biased, queued)  # the cause, if the weights were not finite or too large
        raise
    prints, bias_prints = _refuse_unusable(plans, biased, queued)
    bad = set(nonfinite_factors(items))
    refuse_overflow([(i.plan.name, i.plan.weight) for i in items if i.plan.name in bad], "weights", "initial factors")
    base_print = {p.name: fp for p, fp in zip(plans, prints, strict=True)}
    _refuse_overflow(overflowing_residuals(items, base_print))
    return items, base_print, bias_prints


def _put_all(
    model: nn.Module,
    plans: Sequence[Plan],
    stream: Iterable[Factors],
    cfg: InitConfig,
    run: trained.Run,
    initial: dict[int, tuple[Tensor, Tensor]],
    fsdp: FsdpAdoption | None,
    report_progress: Callable[[int], None],
) -> tuple[list[tuple[PiSSALinear, Factors]], list[Pending | dict[str, Any]], list[Tensor]]:
    """Step 3 of :func:`adapt`: each item's layer built and put in place (:func:`put`); ``initial``: the host copies
    of its A0 and B0, by ``id(item)``. Returns the layers with their items, their residuals' fingerprints (queued)
    and, quantized, their quantization errors (on the device). An error names the modules adapted so far."""
    built: list[tuple[PiSSALinear, Factors]] = []
    # The residuals' fingerprints, so that save() can tell whether one was edited since: queued as each layer is
    # built, so that the device hashes one residual while the host builds the next layer; read back once, after.
    residual_prints: list[Pending | dict[str, Any]] = []
    quant_errors: list[Tensor] = []  # QPiSSA: read back with the fingerprints, after the loop (no sync in it)
    aliases = module_aliases(model)
    try:
        for item in stream:
            residual = None
            if cfg.quantize:
                plan = item.plan
                with torch.no_grad():
                    residual, errors = quantize_residual(
                        plan.weight, item.a0, item.b0, plan.scaling, plan.fan_in_fan_out, qlora_too=cfg.init != "lora",
                        double_quant=cfg.double_quant,
                    )  # fmt: skip
                quant_errors.append(errors)
            layer = put(
                model, item.plan, item.a0, item.b0, cfg.recorded(), run, aliases,
                weight_is_residual=item.weight_is_residual, residual=residual, initial=initial.get(id(item)),
            )  # fmt: skip
            if fsdp is not None:
                fsdp.adopt(item.plan.module, layer)
            built.append((layer, item))
            residual_prints.append(item.residual_print or fingerprint_later(layer.stored_residual()))
            if item.weight_is_residual:
                report_progress(len(built))
    except BaseException as e:
        _stopped(model, plans, e)
    return built, residual_prints, quant_errors


def _stopped(model: nn.Module, plans: Sequence[Plan], e: BaseException) -> NoReturn:
    """Re-raise ``e``, an error while the layers were put in place, naming the modules adapted so far."""
    done = {name for name, layer in pissa_layers(model)} & {p.name for p in plans}
    where = (
        f"minipissa.apply: stopped while putting the layers in place; adapted so far (exact PiSSA layers): "
        f"{sorted(done)}; left as they were: {sorted({p.name for p in plans} - done)}"
    )
    if not isinstance(e, Exception):  # Ctrl-C stays a KeyboardInterrupt
        if hasattr(e, "add_note"):
            e.add_note(where)
        raise e
    raise RuntimeError(f"{where} ({type(e).__name__}: {e})") from e


def put(
    model: nn.Module,
    plan: Plan,
    a0: Tensor,
    b0: Tensor,
    info: dict[str, Any],
    run: trained.Run,
    aliases: dict[int, list[str]],
    *,
    weight_is_residual: bool = False,
    residual: NF4Weight | None = None,
    initial: tuple[Tensor, Tensor] | None = None,
) -> PiSSALinear:
    """The PiSSA layer for ``plan``, from its initial factors A0 (r, in) and B0 (out, r) (:func:`build_layer`), put
    where the module is, under every name it has (``aliases``: :func:`module_aliases` taken before the loop);
    ``run``: the apply or load it belongs to (what it trains in full, its time)."""
    layer = build_layer(plan, a0, b0, info, weight_is_residual=weight_is_residual, residual=residual, initial=initial)
    layer.origin = trained.Origin(plan.name, run)
    replace_module(model, plan.name, layer, aliases)
    return layer


def record_made(
    layers: Sequence[PiSSALinear], residual_prints: Sequence[dict[str, Any]], factors: Sequence[tuple[Tensor, Tensor]]
) -> None:
    """Each new layer's residual fingerprint and the hashes of its A0 and B0 (``factors``, per layer, on the device
    they were made on): what a later save() compares against to tell an edit (core/made.py)."""
    digests = hashes([t for pair in factors for t in pair])
    for i, (layer, residual_print) in enumerate(zip(layers, residual_prints, strict=True)):
        layer.info["residual_fingerprint"] = residual_print
        layer.made = Made.of(residual_print, (digests[2 * i], digests[2 * i + 1]))


def finish(model: nn.Module, what: str) -> None:
    """The last step of every installation: only the adapters and the modules trained in full require gradients,
    and the shared casts cover every PiSSA layer of the model."""
    train_adapters_only(model, what)
    casts.install(model, [layer for _, layer in pissa_layers(model)])


def _refuse_unusable(
    plans: Sequence[Plan], biased: Sequence[Plan], queued: list[Pending]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The fingerprints of the weights of ``plans`` and of the biases of ``biased`` (queued in that order), read
    back at once; a named error if a weight or bias holds NaN or inf, or is too large for them (init.py)."""
    prints = read_all(queued)
    weights, biases = prints[: len(plans)], prints[len(plans) :]
    bad = [(p.name, p.weight) for p, fp in zip(plans, weights, strict=True) if not is_finite(fp)]
    refuse_overflow(bad, "weights", "fingerprint")
    bad = [(p.name, cast(Tensor, p.module.bias)) for p, fp in zip(biased, biases, strict=True) if not is_finite(fp)]
    refuse_overflow(bad, "biases", "fingerprint")
    return weights, {p.name: fp for p, fp in zip(biased, biases, strict=True)}


def _refuse_overflow(names: Sequence[str]) -> None:
    """A named error for the modules whose residual would be infinite; nothing has been changed yet."""
    if names:
        raise ValueError(
            f"minipissa.apply: module(s) {list(names)[:5]}: the residual W - s·B0·A0 leaves the weight dtype's range "
            "(float16 weights near its largest value, 65504) and would be infinite; nothing was changed. Cast the "
            "model to bfloat16 or float32 before apply(), or exclude these modules"
        )
