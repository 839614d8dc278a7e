"""Whole-model operations: apply(), merge/unmerge/unload, original()/disabled() contexts."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields

import torch
from torch import Tensor, nn

from .core.dtensor import is_dtensor, refuse_sharded
from .core.errors import as_module
from .io.checkpoint import open_source
from .nn import casts
from .nn.layer import refuse_merged
from .nn.weight_kinds import refuse_merge
from .plan import named, trained
from .plan.add_adapter import add_adapter
from .plan.config import MEMORY_BUDGET, InitConfig
from .plan.factors import (
    plan_modules,
)
from .plan.fetch import Fetcher, check_device
from .plan.install import adapt
from .plan.replaceable import hooks_on
from .plan.sourced import ModelSource
from .plan.targets import Targets
from .plan.tree import (
    Plan,
    adapted_layers,
    module_aliases,
    pissa_layers,
    replace_module,
    unwrap,
)


def apply(
    model: nn.Module,
    rank: int | Mapping[str, int] | None = None,
    targets: Targets | None = None,
    *,
    config: InitConfig | None = None,
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
    double_quant: bool = False,
    train_modules: Targets | None = None,
    name: str = named.DEFAULT,
    device: torch.device | str | None = None,
    weights: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Replace the target layers of ``model`` by PiSSALinear layers, in place, and return it.

    ``rank``, ``alpha``, ``rslora``, ``init``, ``niter``, ``oversample``, ``seed``, ``components``, ``dropout``,
    ``adapter_dtype``, ``memory_budget``, ``quantize``, ``quant_iters`` and ``double_quant`` say how the adapters
    are initialised, each as :class:`InitConfig` documents it.

    Args:
        targets: module name, suffix, 're:' regex or compiled regex, a list of them, or 'all-linear'
            (every Linear/Conv1D but the output head).
        config: all of those at once, an :class:`InitConfig` (then pass none of them here: a TypeError).
        exclude: patterns (same forms as ``targets``) never to adapt.
        fan_in_fan_out: force the weight layout; default detects Conv1D (weight stored (in, out)).
        progress: ``progress(done, total)`` is called after each adapted module; True writes a progress line
            to stderr. The time taken is in :func:`summary`.
        train_modules: patterns (as ``targets``, any module kind) of modules to train in full beside the adapters,
            e.g. a new classification head; saved with the adapter, exported as PEFT's ``modules_to_save``.
        name: the adapter's name. On a model that has adapters of other names, one more adapter is added beside
            them (plan/add_adapter.py), and the active adapter stays as it was (:func:`minipissa.set_adapter`).
        device: stream the targets' weights onto ``device`` ("cuda:0", "cpu"), one at a time; there only the residual
            (4-bit with ``quantize``), A, B and the bias stay, A0 and B0 go to host memory, the other modules stay
            where they are (``model.to(device)`` moves them after). None: decomposed in place (plan/streamed.py).
        weights: a meta model's values: a ``.safetensors`` file, a ``model.safetensors.index.json``, their directory,
            or a Mapping {key: tensor}; read a tensor at a time, targets streamed, the rest put on ``device``, all
            checked first (plan/sourced.py).

    After apply, only the A and B parameters (and ``train_modules``) require gradients; a target's bias unfrozen
    afterwards trains with them and is saved with the adapter (biases.py). A target whose replacement would drop
    something (hooks on it, its class's own forward, a parametrized weight) is refused, with what to do
    (replaceable.py). ``model`` may be wrapped (``torch.compile``, DataParallel; not DistributedDataParallel: apply
    first, then wrap): the model inside is adapted, and ``model`` as given is returned.
    """
    given = {name: value for name, value in locals().items() if name in INIT_OPTIONS}
    start = time.perf_counter()
    outer, model = model, unwrap(model, "apply", adds_parameters=True)
    cfg = _config(config, given)
    if targets is None:
        raise TypeError("minipissa.apply: targets is required (module names, patterns, or 'all-linear')")
    run = _apply(model, cfg, (targets, exclude, fan_in_fan_out), progress, train_modules, name, (device, weights))
    run.seconds = time.perf_counter() - start
    return outer


def _apply(
    model: nn.Module,
    cfg: InitConfig,
    chosen: tuple[Targets, Targets | None, bool | None],
    progress: bool | Callable[[int, int], None],
    train_modules: Targets | None,
    name: str,
    stream: tuple[torch.device | str | None, str | os.PathLike[str] | Mapping[str, Tensor] | None],
) -> trained.Run:
    """apply()'s work after its checks (``chosen`` = targets, exclude, fan_in_fan_out; ``stream`` = device,
    weights); the run it made."""
    name = named.check_name(name, "apply")
    if set(named.adapter_names(as_module(model, "apply"))) - {name}:  # adapters of other names: one more
        if stream != (None, None):
            raise ValueError("minipissa.apply: device=/weights= make a model's first adapter; add more without them")
        return add_adapter(model, cfg, *chosen, name, progress, train_modules)
    was_active, before = named.active(model), {id(layer) for _, layer in pissa_layers(model)}
    where = check_device(stream[0])
    sourced = None if stream[1] is None else ModelSource(model, open_source(stream[1]))
    plans = plan_modules(model, cfg, *chosen, sourced=sourced is not None)
    full = trained.select(model, train_modules, [p.name for p in plans])
    if where is None and sourced is None:
        run = trained.Run(tuple(full), trained.initial_values(model, full))  # held by the layers it makes
        adapt(model, plans, cfg, progress, run=run)
    else:
        run = _streamed(model, plans, cfg, progress, full, where, sourced)
    named.adopt(model, [layer for _, layer in pissa_layers(model) if id(layer) not in before], name, was_active)
    return run


def _streamed(
    model: nn.Module,
    plans: list[Plan],
    cfg: InitConfig,
    progress: bool | Callable[[int, int], None],
    full: list[str],
    where: torch.device | None,
    sourced: ModelSource | None,
) -> trained.Run:
    """apply() through the streaming init onto ``where`` (the host if None); ``sourced``: the model's values come from
    a checkpoint, the targets' through the stream, the rest read first (checked) and put in place after the layers."""
    sharded = [p.name for p in plans if is_dtensor(p.weight)]
    if sharded:
        raise ValueError(
            f"minipissa.apply: device=/weights= stream plain weights; {sharded[:3]} are FSDP2-sharded. Apply before "
            "fully_shard, or leave device=None (sharded weights are decomposed on their ranks)"
        )
    read, parallel = (None, True) if sourced is None else (sourced.read, sourced.parallel)
    with Fetcher(where or torch.device("cpu"), read, parallel) as fetch:
        rest = None if sourced is None else sourced.load_rest(plans, fetch.transfers)
        run = trained.Run(tuple(full), {} if sourced else trained.initial_values(model, full))
        adapt(model, plans, cfg, progress, run=run, fetch=fetch)
    if rest is not None:
        rest.assign()
        run.initial = trained.initial_values(model, full)  # their values exist now
    return run


#: apply()'s keywords that are InitConfig's options (``stack`` is set through ``config=`` only), and their defaults.
INIT_OPTIONS = {f.name: f.default for f in fields(InitConfig) if f.name != "stack"} | {"rank": None}


def _config(config: InitConfig | None, given: dict[str, object]) -> InitConfig:
    """apply()'s InitConfig: ``config``, or one made of its keywords (``given``); a TypeError for both at once."""
    if config is None:
        if given["rank"] is None:
            raise TypeError("minipissa.apply: pass rank=... (or config=InitConfig(...))")
        return InitConfig(**given)  # type: ignore[arg-type]
    if not isinstance(config, InitConfig):
        raise TypeError(f"minipissa.apply: config must be a minipissa.InitConfig, got {type(config).__name__}")
    both = [k for k, v in given.items() if not (v is INIT_OPTIONS[k] or v == INIT_OPTIONS[k])]
    if both:
        raise TypeError(
            f"minipissa.apply: {both} given beside config=, which holds every init option; set them in the config "
            "instead (dataclasses.replace(config, ...))"
        )
    return config


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (faster inference); :func:`unmerge` restores exactly.

    Keeps each residual while merged: one extra weight's memory per adapted layer.
    """
    refuse_sharded(model, "merge")
    layers = adapted_layers(model, "merge")
    refuse_merge((name, layer.weight_kind) for name, layer in layers)  # first: none merged if one cannot be
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
    refuse_merged(layers, mode)
    # Both modes turn off everything training changed: the modules trained in full compute with their values before
    # training too (as PEFT's disable_adapter() with modules_to_save). Checked here, before anything changes.
    with_initial = trained.computing_with_initial(model, mode)
    before = [(layer.mode, layer.initial_on_device) for layer in layers]
    for layer in layers:
        layer.mode = mode
        a0, b0, _ = layer.original_factors()  # those the residual was made from (several adapters: nn/adapters.py)
        if mode == "original" and a0.device != layer.A.device:  # A0, B0 live on the host: copied once here
            device = layer.A.device
            layer.initial_on_device = (a0.to(device, non_blocking=True), b0.to(device, non_blocking=True))
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
