"""load_lora(): a LoRA adapter in PEFT's format, for the ORIGINAL weights, as one more named adapter of a model.

A LoRA computes W + s·B·A: as a minipissa adapter it has B0 = 0 (its initial A0 is not in the file and changes
nothing: zeros here), so its own residual is W itself. On a layer whose residual is another adapter's, W_res0, it
computes W_res0 + s0·B0_0·A0_0 + s·B·A (nn/adapters.py): W up to W_res0's rounding. The outputs of
convert_to_lora's adapter, loaded so beside the PiSSA adapter it came from, match the PiSSA adapter's to float
rounding, and both keep their own parameters (train one, the other stays as it is).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.checks import Check
from ..core.decompose import compute_dtype
from ..core.dtensor import full_tensor, refuse_sharded
from ..core.errors import PathLike, StateError
from ..core.fingerprint import fingerprint
from ..core.weights import is_conv1d
from ..io.adapter_file import put_records
from ..io.records import ModuleRecord
from ..nn.layer import PiSSALinear
from ..plan import named
from ..plan.settings import check_alpha
from ..plan.targets import is_supported
from ..plan.tree import unwrap
from .peft_config import module_value
from .peft_import import read_peft_adapter

#: A LoRA's init options, as a minipissa adapter records them (its A0 and B0: zeros).
LORA_INIT = {"init": "lora", "niter": None, "oversample": None, "seed": 0, "components": "principal",
             "quantize": None, "quant_iters": 1}  # fmt: skip


def load_lora(model: nn.Module, directory: PathLike, *, name: str = "lora") -> nn.Module:
    """Load a PEFT LoRA directory (``adapter_model.safetensors`` + ``adapter_config.json``, e.g. the output of
    :func:`minipissa.convert_to_lora`) onto ``model`` as adapter ``name``, and return the model. The modules are the
    keys' paths after ``base_model.model.``; each is a PiSSA layer (the LoRA is added beside its adapters; a 4-bit
    residual is refused: it holds another initialisation's quantization error) or a plain Linear/Conv1D (it becomes
    a PiSSA layer whose residual is W). PEFT's files hold no fingerprint of their base, so that they fit this base
    cannot be checked: load a LoRA made for these weights. On a model with adapters the active one stays active."""
    refuse_sharded(model, "load_lora")
    outer, model = model, unwrap(model, "load_lora")
    adapter = named.check_name(name, "load_lora")
    if adapter in named.adapter_names(model):
        raise StateError(f"minipissa.load_lora: the model already has an adapter named '{adapter}'; pass another name=")
    settings, pairs = read_peft_adapter(directory)
    recs = [_record(model, module, a, b, settings, directory) for module, (a, b) in sorted(pairs.items())]
    return put_records(outer, model, ({}, recs, {}), directory, base="original", optimizer=None, name=adapter)


def _base_of(module: nn.Module, where: str) -> tuple[dict[str, Any], Any, bool, torch.dtype]:
    """The fingerprints of the base weight and bias under ``module``, its layout and its decomposition dtype."""
    if isinstance(module, PiSSALinear):
        return (
            module.info["base_fingerprint"],
            module.info.get("bias_fingerprint"),
            module.fan_in_fan_out,
            module.A0.dtype,
        )
    if not is_supported(module):
        raise StateError(f"{where} is a {type(module).__name__}; a LoRA adapts an nn.Linear or Conv1D")
    weight, bias = full_tensor(cast(Tensor, module.weight)), module.bias
    if weight.is_meta or not weight.is_floating_point():
        raise StateError(f"{where} has a {weight.dtype} {'meta ' if weight.is_meta else ''}weight; load the base first")
    bias_print = None if bias is None else fingerprint(full_tensor(cast(Tensor, bias)))
    return fingerprint(weight), bias_print, is_conv1d(module), compute_dtype(weight.dtype)


def _record(
    model: nn.Module, name: str, a: Tensor, b: Tensor, settings: dict[str, Any], directory: PathLike
) -> ModuleRecord:
    """The LoRA of module ``name`` (A (r, in), B (out, r)) as a minipissa adapter record, checked."""
    where = f"minipissa.load_lora: module '{name}' of '{directory}'"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise StateError(f"{where} is not in the model (its path is the key's after 'base_model.model.')") from None
    base, bias, flip, dtype = _base_of(module, where)
    out_f, in_f = base["shape"][::-1] if flip else base["shape"]
    rank = a.shape[0]
    if (tuple(a.shape), tuple(b.shape)) != ((rank, in_f), (out_f, rank)):
        raise StateError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit (out, in) = "
                         f"({out_f}, {in_f})")  # fmt: skip
    if module_value(name, settings, "rank_pattern", "r") != rank:
        raise StateError(f"{where}: the config's r (and rank_pattern, read as PEFT reads them) is not its rank {rank}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise StateError(f"{where} holds NaN or infinite values")
    alpha = module_value(name, settings, "alpha_pattern", "lora_alpha")
    alpha = check_alpha(Check(where, StateError), alpha, rank, settings["use_rslora"])
    info = LORA_INIT | {"singular_values": [], "weight_norm": math.sqrt(base["sumsq"]), "base_fingerprint": base,
                        "residual_fingerprint": base, "bias_fingerprint": bias}  # fmt: skip  # W_res = W - s·0·A0 = W
    zeros = (torch.zeros(rank, in_f, dtype=dtype), torch.zeros(out_f, rank, dtype=dtype))
    return ModuleRecord(
        rank=rank, alpha=alpha, rslora=settings["use_rslora"], fan_in_fan_out=flip,
        dropout=float(settings["lora_dropout"]), adapter_dtype=dtype, quantize=None, name=name, in_features=in_f,
        out_features=out_f, base_dtype=base["dtype"], info=info, A=a.to(dtype), B=b.to(dtype), A0=zeros[0],
        B0=zeros[1],
    )  # fmt: skip
