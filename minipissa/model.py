"""Whole-model operations: apply(), merge/unmerge/unload, original()/disabled() contexts."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import casts, trained
from .config import MEMORY_BUDGET, InitConfig
from .fingerprint import Pending, describe, fingerprint_later, hashes, is_finite, read_all
from .init import (
    Factors,
    factors,
    nonfinite_factors,
    overflowing_residuals,
    plan_modules,
    progress_reporter,
    refuse_overflow,
)
from .layer import PiSSALinear, host_copies
from .made import Made
from .qpissa import ERRORS, quantize_residual
from .replaceable import hooks_on
from .sharded.dtensor import full_tensor, is_dtensor, refuse_sharded
from .sharded.fsdp import FsdpAdoption
from .sharded.init import check_finite_shards, check_layouts, sharded_factors
from .targets import Targets
from .tree import (
    Plan,
    adapted_layers,
    build_layer,
    module_aliases,
    pissa_layers,
    replace_module,
    train_adapters_only,
    unwrap,
)


def apply(
    model: nn.Module,
    rank: int | Mapping[str, int],
    targets: Targets,
    *,
    alpha: float | Mapping[str, float] | None = None,
    rslora: bool = False,
    init: str = "pissa",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    components: str = "principal",
    dropout: float = 0.0,
    exclude: Targets | None = None,
    fan_in_fan_out: bool | None = None,
    adapter_dtype: torch.dtype | None = None,
    memory_budget: int = MEMORY_BUDGET,
    progress: bool | Callable[[int, int], None] = False,
    quantize: str | None = None,
    quant_iters: int = 1,
    train_modules: Targets | None = None,
) -> nn.Module:
    """Replace the target layers of ``model`` by PiSSALinear layers, in place, and return it.

    Args:
        rank: adapter rank, or a mapping from target pattern to rank ('*' = every other module).
        targets: module name, suffix, 're:' regex or compiled regex, a list of them, or 'all-linear'
            (every Linear/Conv1D but the output head).
        alpha: LoRA alpha (int/float or mapping like ``rank``); default = the module's rank, so s = 1.
        rslora: scaling alpha / sqrt(r) instead of alpha / r.
        init: 'pissa', or 'lora' (Kaiming-uniform A, zero B, base untouched) for comparisons, or 'loftq'
            (with ``quantize``: the adapter chosen from the quantization error of W, LoftQ's alternation).
        niter: None for the exact top-r (float64 Gram eigendecomposition, refined; see
            ``decompose.start``); an int for a randomized SVD with that many power iterations.
        oversample: extra sketch columns for the randomized SVD; default 4 * rank.
        seed: seeds each module's own generator together with its name; the global RNG is untouched.
        components: 'principal' (PiSSA) or 'minor' (MiLoRA: bottom r triplets; exact SVD only).
        dropout: dropout on the adapter's input only.
        exclude: patterns (same forms as ``targets``) never to adapt.
        fan_in_fan_out: force the weight layout; default detects Conv1D (weight stored (in, out)).
        adapter_dtype: dtype of the trainable A and B; default float32 (float64 for float64 weights).
        memory_budget: bytes of extra memory the decompositions may use at once (on a GPU, weights of
            one shape are stacked and decomposed together in chunks of this size); default 1 GiB.
        progress: ``progress(done, total)`` is called after each adapted module; True shows a tqdm
            bar when tqdm is installed. The time taken is in :func:`summary`.
        quantize: None, or 'nf4' (QPiSSA): each residual is stored in 4-bit NF4, bit-compatible with
            bitsandbytes (the decomposition runs in full precision first).
        quant_iters: with ``quantize``, how many times the adapter is chosen against the quantizer: the top-r of
            W, then ``quant_iters - 1`` times the top-r of W - deq(nf4(W - P)) (the authors' multi-iteration
            QPiSSA; 5 in their checkpoints); with init='loftq', LoftQ's iterations.
        train_modules: patterns (as ``targets``, any module kind) of modules to train in full beside the adapters,
            e.g. a new classification head; saved with the adapter, exported as PEFT's ``modules_to_save``.

    After apply, only the A and B parameters (and ``train_modules``) require gradients; a target's bias unfrozen
    afterwards trains with them and is saved with the adapter (biases.py). A target whose replacement would drop
    something (hooks on it, its class's own forward, a parametrized weight) is refused, with what to do
    (replaceable.py). ``model`` may be wrapped (``torch.compile``, DataParallel; not DistributedDataParallel: apply
    first, then wrap): the model inside is adapted, and ``model`` as given is returned.
    """
    start = time.perf_counter()
    outer, model = model, unwrap(model, "apply", adds_parameters=True)
    cfg = InitConfig(
        rank, alpha, rslora, init, niter, oversample, seed, components, dropout, adapter_dtype, memory_budget,
        quantize=quantize, quant_iters=quant_iters,
    )  # fmt: skip
    plans = plan_modules(model, cfg, targets, exclude, fan_in_fan_out)
    full = trained.select(model, train_modules, [p.name for p in plans])
    run = trained.Run(tuple(full), trained.initial_values(model, full))  # held by the layers it makes
    adapt(model, plans, cfg, progress, run=run)
    run.seconds = time.perf_counter() - start
    return outer


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
    fsdp = None
    if sharded and cfg.quantize:
        raise ValueError(
            f"minipissa.apply: quantize='nf4' on FSDP2-sharded weights ({sharded[0].name}, ...) is not supported; "
            "apply before fully_shard (the 4-bit codes then stay whole on each rank), or leave quantize=None"
        )
    if sharded:  # FSDP2 / DTensor weights: each factored on one owner rank
        check_layouts(sharded)
        fsdp = FsdpAdoption(model, sharded)
        check_finite_shards(sharded)
    queued = [fingerprint_later(p.weight) for p in plain]  # read back once the factors are queued too
    # The biases are part of the base: fingerprinted (every rank alike, in plan order), so that load() can tell a
    # base with other biases and save() a bias trained since
    biased = [p for p in plans if p.module.bias is not None]
    queued += [fingerprint_later(full_tensor(cast(Tensor, p.module.bias))) for p in biased]
    report_progress = progress_reporter(progress, len(plans))
    items = []
    try:
        for item in factors(plain, cfg) if given is None else given:
            items.append(item)
            report_progress(len(items))
    except Exception:
        _refuse_unusable(plain, biased, queued)  # the cause, if the weights were not finite or too large
        raise
    prints, bias_prints = _refuse_unusable(plain, biased, queued)
    bad = set(nonfinite_factors(items))
    refuse_overflow([(i.plan.name, i.plan.weight) for i in items if i.plan.name in bad], "weights", "initial factors")
    base_print = {p.name: fp for p, fp in zip(plain, prints, strict=True)}
    _refuse_overflow(overflowing_residuals(items, base_print))
    # Every A0 and B0 to host memory, queued now to run beside the loop below (not two syncs per layer inside it).
    on_host = host_copies([t for item in items for t in (item.a0, item.b0)], wait=False)
    initial = {id(item): (on_host[2 * i], on_host[2 * i + 1]) for i, item in enumerate(items)}
    built: list[tuple[PiSSALinear, Factors]] = []
    # The residuals' fingerprints, so that save() can tell whether one was edited since: queued as each layer is
    # built, so that the device hashes one residual while the host builds the next layer; read back once, after.
    residual_prints: list[Pending | dict[str, Any]] = []
    quant_errors: list[Tensor] = []  # QPiSSA: read back with the fingerprints, after the loop (no sync in it)
    aliases = module_aliases(model)
    try:
        for item in itertools.chain(sharded_factors(sharded, cfg), items):
            residual = None
            if cfg.quantize:
                plan = item.plan
                with torch.no_grad():
                    residual, errors = quantize_residual(
                        plan.weight, item.a0, item.b0, plan.scaling, plan.fan_in_fan_out, qlora_too=cfg.init != "lora"
                    )
                quant_errors.append(errors)
            layer = build_layer(
                item.plan,
                item.a0,
                item.b0,
                cfg.recorded(),
                weight_is_residual=item.weight_is_residual,
                residual=residual,
                initial=initial.get(id(item)),
            )
            layer.origin = trained.Origin(item.plan.name, run)
            replace_module(model, item.plan.name, layer, aliases)
            if fsdp is not None:
                fsdp.adopt(item.plan.module, layer)
            built.append((layer, item))
            residual_prints.append(item.residual_print or fingerprint_later(layer.stored_residual()))
            if item.weight_is_residual:
                report_progress(len(items) + len(built))
    except BaseException as e:
        done = {name for name, layer in pissa_layers(model)} & {p.name for p in plans}
        where = (
            f"minipissa.apply: stopped while putting the layers in place; adapted so far (exact PiSSA layers): "
            f"{sorted(done)}; left as they were: {sorted({p.name for p in plans} - done)}"
        )
        if not isinstance(e, Exception):  # Ctrl-C stays a KeyboardInterrupt
            if hasattr(e, "add_note"):
                e.add_note(where)
            raise
        raise RuntimeError(f"{where} ({type(e).__name__}: {e})") from e
    for device in {item.a0.device for item in items if item.a0.is_cuda}:  # the host copies of A0 and B0 have landed
        torch.cuda.current_stream(device).synchronize()
    digests = hashes([t for _, item in built for t in (item.a0, item.b0)])  # what the host copies hold
    for i, ((layer, item), residual_print) in enumerate(zip(built, read_all(residual_prints), strict=True)):
        layer.info.update(describe(item.sigma, item.base_print or base_print[item.plan.name]))
        layer.info["residual_fingerprint"] = residual_print
        layer.made = Made.of(residual_print, (digests[2 * i], digests[2 * i + 1]))
        layer.info["bias_fingerprint"] = bias_prints.get(item.plan.name)
    for (layer, _), errors in zip(built, quant_errors, strict=False):  # one per layer when quantized
        layer.info.update(zip(ERRORS, errors.tolist(), strict=True))
    train_adapters_only(model)
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


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (faster inference); :func:`unmerge` restores exactly.

    Keeps each residual while merged: one extra weight's memory per adapted layer.
    """
    refuse_sharded(model, "merge")
    layers = adapted_layers(model, "merge")
    quantized = [name for name, layer in layers if layer.quantized]
    if quantized:  # checked first: no layer is merged if one cannot be
        raise RuntimeError(
            f"minipissa.merge: module(s) {quantized[:5]} hold a 4-bit NF4 residual (QPiSSA); folding s·B·A into 4 "
            "bits would round most of the training away, so nothing was merged. Keep the adapters separate, or "
            "minipissa.unload(model) for a full-precision model (deq(W_res) + s·B·A), or serve "
            "minipissa.convert_to_lora's LoRA on the original weights"
        )
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, bit-exactly."""
    for _, layer in adapted_layers(model, "unmerge"):
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge and put the original Linear/Conv1D classes back: the fine-tuned model, no minipissa left."""
    refuse_sharded(model, "unload")
    outer, model = model, unwrap(model, "unload")
    layers = adapted_layers(model, "unload")
    hooked = [(name, hooks) for name, layer in layers if (hooks := hooks_on(layer))]
    if hooked:  # they would stay on the PiSSA layer, which leaves the model
        raise ValueError(
            f"minipissa.unload: the PiSSA layer '{hooked[0][0]}' has {'; '.join(hooked[0][1])}, which the plain layer "
            "put back would not have; remove them (handle.remove()) first, and register them on it after unload"
        )
    casts.remove([layer for _, layer in layers])
    aliases = module_aliases(model)
    for name, layer in layers:
        replace_module(model, name, layer.unload(), aliases)
    return outer


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    layers = [layer for _, layer in adapted_layers(model, mode)]
    if any(layer.merged for layer in layers):
        raise RuntimeError(f"minipissa.{mode}(): the model is merged; call minipissa.unmerge(model) first")
    # Both modes turn off everything training changed: the modules trained in full compute with their values before
    # training too (as PEFT's disable_adapter() with modules_to_save). Checked here, before anything changes.
    with_initial = trained.computing_with_initial(model, mode)
    before = [(layer.mode, layer.initial_on_device) for layer in layers]
    for layer in layers:
        layer.mode = mode
        if mode == "original" and layer.A0.device != layer.A.device:  # A0, B0 live on the host: copied once here
            device = layer.A.device
            layer.initial_on_device = (layer.A0.to(device, non_blocking=True), layer.B0.to(device, non_blocking=True))
    try:
        with with_initial:
            yield model
    finally:
        for layer, (previous, initial) in zip(layers, before, strict=True):
            layer.mode, layer.initial_on_device = previous, initial


def original(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside ``with minipissa.original(model):`` the model computes the exact pre-PiSSA function
    (W_res + s·B0·A0, and the modules trained in full with their values before training), e.g. as a DPO/KL
    reference, whatever training did to A, B and those modules."""
    return _mode(model, "original")


def disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Inside ``with minipissa.disabled(model):`` the adapters are off: the residual model alone (the modules
    trained in full with their values before training, as in :func:`original`)."""
    return _mode(model, "disabled")
