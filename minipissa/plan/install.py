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
from ..core.weights import frozen
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
from .fetch import Fetcher
from .progress import progress_reporter
from .sharded.factors import check_finite_shards, check_layouts, sharded_factors
from .sharded.fsdp import FsdpAdoption
from .streamed import overflowing, streamed_factors
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
    fetch: Fetcher | None = None,
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
    ``fetch``: the streaming init (streamed.py): each plain weight fetched onto its device, and its residual and
    fingerprint made there in step 1; the layers then take their residuals and biases from the stream.
    """
    run = trained.Run() if run is None else run
    sharded = [p for p in plans if is_dtensor(p.weight)]
    plain = [p for p in plans if not is_dtensor(p.weight)]
    fsdp = _adopt_sharded(model, sharded, cfg)
    # The biases are part of the base: fingerprinted (every rank alike, in plan order), so that load() can tell a
    # base with other biases and save() a bias trained since
    biased = [p for p in plans if p.module.bias is not None]
    queued = None  # streamed: each weight's fingerprint is made with its factors, where the weight is fetched
    if fetch is None:
        queued = [fingerprint_later(p.weight) for p in plain]  # read back once the factors are queued too
        queued += [fingerprint_later(full_tensor(cast(Tensor, p.module.bias))) for p in biased]
    report_progress = progress_reporter(progress, len(plans))
    stream = given if given is not None else streamed_factors(plain, cfg, fetch) if fetch else factors(plain, cfg)
    items, base_print, bias_prints = _checked_factors(plain, biased, queued, stream, fetch, report_progress)
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
        layer.info.update(describe(item.sigma, base_print.get(item.plan.name) or cast(dict, item.base_print)))
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
    queued: list[Pending] | None,
    stream: Iterable[Factors],
    fetch: Fetcher | None,
    report_progress: Callable[[int], None],
) -> tuple[list[Factors], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Steps 1-2 of :func:`adapt` for the plain weights ``plans``: their factors (``stream``), and the fingerprints
    ``queued`` (of ``plans``' weights, then of ``biased``'s biases; None: streamed, made with each item) read back; a
    named error for a weight or bias that is not finite or too large, for non-finite factors and for an overflowing
    residual. Returns the factors and the fingerprints of the weights and of the biases, by module name."""
    items: list[Factors] = []
    weight_of = (lambda p: p.weight) if fetch is None else fetch.host_weight  # where an error message measures W
    try:
        for item in stream:
            items.append(item)
            report_progress(len(items))
    except Exception:
        _refuse_unusable(*_streamed_prints(plans, biased, items, queued), fetch)  # the cause, if not finite
        raise
    prints, bias_prints = _refuse_unusable(*_streamed_prints(plans, biased, items, queued), fetch)
    bad = set(nonfinite_factors(items))
    refuse_overflow(
        [(i.plan.name, weight_of(i.plan)) for i in items if i.plan.name in bad], "weights", "initial factors"
    )
    base_print = {p.name: fp for p, fp in zip(plans, prints, strict=True)}
    in_place = [i for i in items if i.made is None]
    _refuse_overflow(overflowing_residuals(in_place, base_print) + overflowing(items))
    return items, base_print, bias_prints


def _streamed_prints(
    plans: Sequence[Plan], biased: Sequence[Plan], items: Sequence[Factors], queued: list[Pending] | None
) -> tuple[Sequence[Plan], Sequence[Plan], list[Pending]]:
    """What :func:`_refuse_unusable` reads: ``queued`` for ``plans`` and ``biased``; streamed (``queued`` None), the
    fingerprints made with the ``items`` so far, for the plans among them."""
    if queued is not None:
        return plans, biased, queued
    made = {i.plan.name: i.made for i in items if i.made is not None}
    done, done_biased = [p for p in plans if p.name in made], [p for p in biased if p.name in made]
    weights = [made[p.name].weight_print for p in done]
    return done, done_biased, weights + [cast(Pending, made[p.name].bias_print) for p in done_biased]


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
            residual: NF4Weight | Tensor | None = None
            if item.made is not None:  # streamed: made on the device already, the bias moved there too
                residual = item.made.residual
                bias = item.plan.module.bias
                if item.made.bias is not None and (bias.is_meta or bias.device != item.made.bias.device):
                    item.plan.module.bias = frozen(item.made.bias)  # where it stays (the module's own if it was)
                if item.made.errors is not None:
                    quant_errors.append(item.made.errors)
            elif cfg.quantize:
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
    residual: NF4Weight | Tensor | None = None,
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
    plans: Sequence[Plan], biased: Sequence[Plan], queued: list[Pending], fetch: Fetcher | None = None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The fingerprints of the weights of ``plans`` and of the biases of ``biased`` (queued in that order), read
    back at once; a named error if a weight or bias holds NaN or inf, or is too large for them (init.py). ``fetch``:
    the streamed road's, which reads a refused tensor again for the message."""
    prints = read_all(queued)
    weights, biases = prints[: len(plans)], prints[len(plans) :]
    weight_of = (lambda p: p.weight) if fetch is None else fetch.host_weight
    bias_of = (lambda p: p.module.bias) if fetch is None else fetch.host_bias
    bad = [(p.name, weight_of(p)) for p, fp in zip(plans, weights, strict=True) if not is_finite(fp)]
    refuse_overflow(bad, "weights", "fingerprint")
    bad = [(p.name, cast(Tensor, bias_of(p))) for p, fp in zip(biased, biases, strict=True) if not is_finite(fp)]
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
