"""import_peft(): a PiSSA adapter trained with PEFT, as minipissa layers on the original base model.

PEFT keeps PiSSA's initial factors only in the adapter saved right after ``get_peft_model(..., init_lora_weights=
"pissa")`` (its "pissa_init" directory); the trained adapter holds A and B. With both and the ORIGINAL base model,
the model gets minipissa layers whose residual is minipissa's own, W - s·B0·A0 (rebuilt by the function that
``load`` uses), and A, B from the trained adapter, so that ``save``, ``load``, ``convert_to_lora``, ``original()``
and the fingerprints work as for an adapter made here. Everything is checked before the model changes: each
config field (PEFT's types, PEFT's defaults where a key is missing), the tensors' shapes against each other and
the model, and the initial factors against the base weights (:mod:`minipissa.pissa_check`). The initial factors
then go through the same ``adapt`` as ``apply``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core.decompose import compute_dtype
from ..core.dtensor import is_dtensor
from ..core.errors import PathLike, StateError, as_module, as_path
from ..core.linalg import product_singular_values
from ..core.weights import weight_matrix
from ..io.adapter_file import save
from ..plan.config import InitConfig
from ..plan.factors import Factors, plan_modules
from ..plan.install import adapt
from ..plan.tree import Plan, pissa_layers, unwrap
from .peft_config import lora_settings, module_value
from .pissa_check import check_pissa_init

KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])\.weight")
Pairs = dict[str, tuple[Tensor, Tensor]]


def _load(path: Path, what: str) -> dict[str, Tensor]:
    """A safetensors file's tensors; a StateError for anything unreadable (the parser raises its own type)."""
    try:
        return load_file(str(path))
    except Exception as e:  # OSError, or safetensors' SafetensorError (no ValueError): not a safetensors file
        raise StateError(f"minipissa.import_peft: '{path}' is not a readable safetensors {what}: {e}") from None


def read_peft_adapter(directory: PathLike, missing: str = "") -> tuple[dict[str, Any], Pairs]:
    """PEFT's ``adapter_config.json`` (every field read here checked, PEFT's defaults filled in) and
    {module: (A (r, in), B (out, r))} of a LoRA adapter directory. ``missing``: what to add to the error for a
    directory without a readable config."""
    folder = as_path(directory, "PEFT adapter directory")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise StateError(
            f"minipissa.import_peft: '{folder}' is not a readable PEFT adapter directory: {e}{missing}"
        ) from None
    tensors = _load(folder / "adapter_model.safetensors", "file (the adapter's tensors)")
    settings = lora_settings(config, f"minipissa.import_peft: '{folder / 'adapter_config.json'}'")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise StateError(
                f"minipissa.import_peft: '{folder}' holds '{key}', which is not a LoRA A/B (modules_to_save, "
                "biases and other tuners are not imported)"
            )
        pairs.setdefault(match["name"], {})[match["which"]] = tensor
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise StateError(f"minipissa.import_peft: '{folder}' has no complete lora_A/lora_B pairs")
    for name, p in pairs.items():
        a, b = p["A"], p["B"]
        if not (a.ndim == b.ndim == 2 and b.shape[1] == a.shape[0] and a.is_floating_point() and b.is_floating_point()):
            raise StateError(
                f"minipissa.import_peft: '{folder}': module '{name}' has lora_A {tuple(a.shape)} ({a.dtype}) and "
                f"lora_B {tuple(b.shape)} ({b.dtype}); a LoRA pair is float A (r, in) and B (out, r)"
            )
    return settings, {name: (p["A"], p["B"]) for name, p in pairs.items()}


def import_peft(model: nn.Module, initial: PathLike, trained: PathLike) -> nn.Module:
    """Adapt the ORIGINAL base ``model`` in place with a PiSSA adapter trained in PEFT, and return it.

    Args:
        initial: the adapter PEFT saved right after its PiSSA init (A0, B0: its "pissa_init" directory).
        trained: the trained adapter (A, B), of the same modules and ranks.

    Raises:
        StateError: a field, tensor or shape of either adapter is not PEFT's or does not fit the model; the initial
            adapter is missing, is not a PiSSA init, or not this base's (:func:`pissa_check.check_pissa_init`:
            another model's or checkpoint's, zero, or the trained one); nothing is changed then.
    """
    as_module(model, "import_peft")
    outer, model = model, unwrap(model, "import_peft", adds_parameters=True)
    init_settings, init = read_peft_adapter(
        initial,
        ". The initial adapter (PEFT's 'pissa_init': the adapter saved right after get_peft_model(..., "
        "init_lora_weights='pissa'), before training) is needed: A0 and B0 are in no other file, and without them "
        "neither the residual nor original() can be rebuilt",
    )
    settings, final = read_peft_adapter(trained)
    kind = init_settings["init_lora_weights"]
    niter = re.fullmatch(r"pissa(?:_niter_(\d+))?", kind) if isinstance(kind, str) else None
    if niter is None:
        raise StateError(
            f"minipissa.import_peft: '{initial}' was initialised with init_lora_weights={kind!r}; the initial "
            "adapter must be PEFT's PiSSA init ('pissa' or 'pissa_niter_K'), saved before training"
        )
    if set(init) != set(final) or any([t.shape for t in init[n]] != [t.shape for t in final[n]] for n in init):
        raise StateError(
            f"minipissa.import_peft: the initial adapter ('{initial}') and the trained one ('{trained}') adapt "
            "different modules or shapes; give the initial adapter of this very run"
        )
    names = sorted(init)
    ranks, alphas = _module_settings(names, init_settings, settings, init)
    bad = [n for n in names if not all(bool(torch.isfinite(t).all()) for t in (*init[n], *final[n]))]
    if bad:
        raise StateError(f"minipissa.import_peft: module(s) {bad[:5]} hold NaN or infinite adapter values")
    try:
        cfg = InitConfig(
            rank=ranks, alpha=alphas, rslora=settings["use_rslora"], init="pissa",
            niter=None if niter[1] is None else int(niter[1]), dropout=settings["lora_dropout"],
        )  # fmt: skip
        plans = plan_modules(model, cfg, names)
    except (KeyError, ValueError, TypeError) as e:
        raise StateError(f"minipissa.import_peft: the adapter's config or shapes do not fit the model: {e}") from None
    given = _initial_factors(plans, init, final, niter[1] is None, f"minipissa.import_peft: '{initial}'")
    adapt(model, plans, cfg, given=given)
    layers = dict(pissa_layers(model))
    with torch.no_grad():
        for name in names:
            a, b = final[name]
            layers[name].A.copy_(a)
            layers[name].B.copy_(b)
    return outer


def _initial_factors(plans: list[Plan], init: Pairs, final: Pairs, exact: bool, where: str) -> list[Factors]:
    """The checked initial factors of each plan, in the decomposition dtype on its weight's device."""
    given = []
    for plan in plans:
        a0, b0 = init[plan.name]
        if (a0.shape, b0.shape) != ((plan.rank, plan.shape[1]), (plan.shape[0], plan.rank)):
            raise StateError(
                f"minipissa.import_peft: module '{plan.name}' is {plan.shape} in the model; the adapter's A0 is "
                f"{tuple(a0.shape)}, B0 {tuple(b0.shape)}"
            )
        if is_dtensor(plan.weight):
            raise StateError(
                f"minipissa.import_peft: module '{plan.name}' is sharded (FSDP2); import onto the unsharded model, "
                "then shard it"
            )
        matrix = weight_matrix(plan.weight.detach(), plan.fan_in_fan_out)
        check_pissa_init(plan.name, matrix, a0, b0, plan.scaling, exact, final[plan.name], where)
        dtype, device = compute_dtype(plan.weight.dtype), plan.weight.device
        a0, b0 = a0.to(device, dtype), b0.to(device, dtype)
        # PiSSA's initial factors are sqrt(S / s) V^T and U sqrt(S / s): s B0 A0 has singular values S.
        sigma = product_singular_values(a0, b0, plan.scaling).to(dtype)
        given.append(Factors(plan, a0, b0, sigma))
    return given


def _module_settings(
    names: list[str], init_settings: dict[str, Any], settings: dict[str, Any], init: Pairs
) -> tuple[dict[str, int], dict[str, float]]:
    """Each module's rank and alpha as PEFT reads them from the config; both adapters must agree, and the rank must
    be the tensors' (PEFT truncates the factors of r > min(out, in), keeping r in the scaling: not importable)."""
    for key in ("use_rslora", "fan_in_fan_out"):
        if init_settings[key] != settings[key]:
            raise StateError(f"minipissa.import_peft: '{key}' differs between the initial and the trained adapter")
    ranks, alphas = {}, {}
    for name in names:
        first, second = (
            (module_value(name, s, "rank_pattern", "r"), float(module_value(name, s, "alpha_pattern", "lora_alpha")))
            for s in (init_settings, settings)
        )
        if first != second:
            raise StateError(
                f"minipissa.import_peft: module '{name}' has r = {first[0]}, lora_alpha = {first[1]:g} in the initial "
                f"adapter's config and r = {second[0]}, lora_alpha = {second[1]:g} in the trained one's"
            )
        rank = init[name][0].shape[0]
        if first[0] != rank:
            raise StateError(
                f"minipissa.import_peft: module '{name}': the config gives r = {first[0]} (r and rank_pattern, read "
                f"as PEFT reads them), its tensors have rank {rank}"
            )
        ranks[name], alphas[name] = first
    return ranks, alphas


class Conv1D(nn.Module):
    """A GPT-2 style Conv1D (weight stored (in, out), ``nf`` = out) for :func:`skeleton`: no transformers needed."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.nf = weight.shape[1]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


def skeleton(names: list[str], weights: dict[str, Tensor], fan_in_fan_out: bool) -> nn.Module:
    """Just the modules ``names`` (Linear, or Conv1D), at their paths, holding the base checkpoint's weights (keys
    ``<name>.weight`` / ``.bias``, or without the name's first component, as GPT-2's original checkpoints store
    them): enough to import an adapter and write its file without building the model."""
    root = nn.Module()
    for name in names:
        key = next((k for k in (name, name.partition(".")[2]) if f"{k}.weight" in weights), None)
        if key is None:
            raise StateError(f"minipissa.import_peft: the base checkpoint has no '{name}.weight'")
        weight, bias = weights[f"{key}.weight"], weights.get(f"{key}.bias")
        if weight.ndim != 2:
            raise StateError(f"minipissa.import_peft: '{name}.weight' in the base checkpoint is not a matrix")
        if fan_in_fan_out:
            module: nn.Module = Conv1D(weight, bias)
        else:
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            module.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias, requires_grad=False)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def import_peft_files(initial: PathLike, trained: PathLike, base: PathLike, out: PathLike) -> list[str]:
    """:func:`import_peft` without the model: the adapted modules' weights come from the base checkpoint
    (safetensors) ``base``; writes the minipissa adapter file ``out`` (which loads onto the full base model).
    Returns the modules imported."""
    settings, final = read_peft_adapter(trained)
    weights = _load(as_path(base, "base checkpoint"), "checkpoint (the base model's weights)")
    names = sorted(final)
    model = skeleton(names, weights, settings["fan_in_fan_out"])
    save(import_peft(model, initial, trained), out)
    return names
