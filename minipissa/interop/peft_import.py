"""import_peft(): a PiSSA adapter trained with PEFT, as minipissa layers on the original base model.

PEFT keeps PiSSA's initial factors only in the adapter saved right after ``get_peft_model(..., init_lora_weights=
"pissa")`` (its "pissa_init" directory); the trained adapter holds A and B. With both and the ORIGINAL base model,
the model gets minipissa layers whose residual is minipissa's own, W - s·B0·A0 (rebuilt by the function that
``load`` uses), and A, B from the trained adapter, so that ``save``, ``load``, ``convert_to_lora``, ``original()``
and the fingerprints work as for an adapter made here. The initial factors go through the same ``adapt`` as
``apply`` (checked, then put in place; nothing changes on an error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core.errors import PathLike, StateError, as_module, as_path
from ..io.adapter_file import save
from ..plan.config import InitConfig
from ..plan.factors import Factors, plan_modules
from ..plan.install import adapt
from ..plan.tree import pissa_layers, unwrap

KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])\.weight")


def read_peft_adapter(directory: PathLike) -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor]]]:
    """PEFT's ``adapter_config.json`` and {module: (A (r, in), B (out, r))} of a LoRA adapter directory."""
    folder = as_path(directory, "PEFT adapter directory")
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise StateError(f"minipissa.import_peft: '{folder}' is not a readable PEFT adapter directory: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise StateError(f"minipissa.import_peft: '{folder}' is not a PEFT LoRA adapter (peft_type LORA, no DoRA)")
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
    return config, {name: (p["A"], p["B"]) for name, p in pairs.items()}


def _pattern_value(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matching the module's name (exact, suffix, or regex)."""
    for key, value in patterns.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def import_peft(model: nn.Module, initial: PathLike, trained: PathLike) -> nn.Module:
    """Adapt the ORIGINAL base ``model`` in place with a PiSSA adapter trained in PEFT, and return it.

    Args:
        initial: the adapter PEFT saved right after its PiSSA init (A0, B0: its "pissa_init" directory).
        trained: the trained adapter (A, B), of the same modules and ranks.

    Raises:
        StateError: the initial adapter is missing, is not a PiSSA init, or does not fit the trained one or the
            model; nothing is changed then.
    """
    as_module(model, "import_peft")
    outer, model = model, unwrap(model, "import_peft", adds_parameters=True)
    try:
        init_config, init = read_peft_adapter(initial)
    except StateError as e:
        raise StateError(
            f"{e}. The initial adapter (PEFT's 'pissa_init': the adapter saved right after get_peft_model(..., "
            "init_lora_weights='pissa'), before training) is needed: A0 and B0 are in no other file, and without "
            "them neither the residual nor original() can be rebuilt"
        ) from None
    config, final = read_peft_adapter(trained)
    kind = init_config.get("init_lora_weights")
    niter = re.fullmatch(r"pissa(?:_niter_(\d+))?", kind) if isinstance(kind, str) else None
    if niter is None:
        raise StateError(
            f"minipissa.import_peft: '{initial}' was initialised with init_lora_weights={kind!r}; the initial "
            "adapter must be PEFT's PiSSA init ('pissa' or 'pissa_niter_K'), saved before training"
        )
    if set(init) != set(final) or any(init[n][0].shape != final[n][0].shape for n in init):
        raise StateError(
            f"minipissa.import_peft: the initial adapter ('{initial}') and the trained one ('{trained}') adapt "
            "different modules or ranks; give the initial adapter of this very run"
        )
    for key in ("use_rslora", "lora_alpha", "alpha_pattern", "rank_pattern"):
        if init_config.get(key) != config.get(key):
            raise StateError(f"minipissa.import_peft: '{key}' differs between the initial and the trained adapter")
    names = sorted(init)
    bad = [n for n in names if not all(bool(torch.isfinite(t).all()) for t in (*init[n], *final[n]))]
    if bad:
        raise StateError(f"minipissa.import_peft: module(s) {bad[:5]} hold NaN or infinite adapter values")
    try:
        alphas = {n: float(_pattern_value(n, config.get("alpha_pattern") or {}, config["lora_alpha"])) for n in names}
        cfg = InitConfig(
            rank={n: init[n][0].shape[0] for n in names}, alpha=alphas, rslora=bool(config.get("use_rslora")),
            init="pissa", niter=None if niter[1] is None else int(niter[1]),
            dropout=float(config.get("lora_dropout") or 0.0),
        )  # fmt: skip
        plans = plan_modules(model, cfg, names)
    except (KeyError, ValueError, TypeError) as e:
        raise StateError(f"minipissa.import_peft: the adapter's config or shapes do not fit the model: {e}") from None
    given = []
    for plan in plans:
        a0, b0 = init[plan.name]
        if (a0.shape, b0.shape) != ((plan.rank, plan.shape[1]), (plan.shape[0], plan.rank)):
            raise StateError(
                f"minipissa.import_peft: module '{plan.name}' is {plan.shape} in the model; the adapter's A0 is "
                f"{tuple(a0.shape)}, B0 {tuple(b0.shape)}"
            )
        dtype, device = torch.float64 if plan.weight.dtype == torch.float64 else torch.float32, plan.weight.device
        a0, b0 = a0.to(device, dtype), b0.to(device, dtype)
        # PiSSA's initial factors are sqrt(S / s) V^T and U sqrt(S / s): s B0 A0 has singular values S.
        rb, ra = torch.linalg.qr(b0.double())[1], torch.linalg.qr(a0.double().mT)[1]  # r x r: no (out, in) product
        sigma = torch.linalg.svdvals(plan.scaling * (rb @ ra.mT)).to(dtype)
        given.append(Factors(plan, a0, b0, sigma))
    adapt(model, plans, cfg, given=given)
    layers = dict(pissa_layers(model))
    with torch.no_grad():
        for name in names:
            a, b = final[name]
            layers[name].A.copy_(a)
            layers[name].B.copy_(b)
    return outer


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
    config, final = read_peft_adapter(trained)
    try:
        weights = load_file(str(as_path(base, "base checkpoint")))
    except (OSError, ValueError) as e:
        raise StateError(f"minipissa.import_peft: '{base}' is not a readable safetensors checkpoint: {e}") from None
    names = sorted(final)
    model = skeleton(names, weights, bool(config.get("fan_in_fan_out")))
    save(import_peft(model, initial, trained), out)
    return names
