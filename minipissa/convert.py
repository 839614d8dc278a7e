"""PiSSA -> LoRA on the ORIGINAL weights, written in PEFT's on-disk adapter layout.

A trained PiSSA layer computes W_res + s·B·A = W - s·B0·A0 + s·B·A = W + s·[B | -B0]·[A ; A0], so
the update of the original W is a LoRA of rank 2r with A' = [A ; A0] (2r, in) and
B' = [B | -B0] (out, 2r). Keeping s = alpha'/r' means alpha' = 2·alpha (LoRA) or sqrt(2)·alpha
(rsLoRA). Optionally ``rank=k`` re-compresses s·B'·A' by a truncated SVD to rank k.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import linalg, state
from .atomic import atomic_write_dir
from .errors import PathLike, StateError, as_path
from .records import ModuleRecord
from .safefile import write_safetensors
from .sharded.dtensor import write_once
from .tree import adapted_layers

PEFT_PREFIX = "base_model.model."
#: vLLM's default ``max_lora_rank``: adapters of higher rank need server flags or ``rank=``.
SERVING_RANK_LIMIT = 16


@dataclass
class ConversionReport:
    """What convert_to_lora() wrote.

    ``relative_error`` is ‖ΔW - ΔW_k‖_F / ‖ΔW‖_F over all modules together (0.0 without ``rank=``),
    ΔW being the exact update s·B'·A' of the original weights; ``module_errors`` per module.

    ``quantization_errors`` (QPiSSA adapters): per module, how far the LoRA on the original weights is from the
    trained 4-bit model: their weights differ by W_res - deq(nf4(W_res)) exactly, reported as
    ‖W_res - deq(nf4(W_res))‖_F / ‖W‖_F (measured at apply), the relative error of the layer outputs for
    inputs spread evenly over directions.
    """

    out_dir: Path
    rank: int  # the adapter's r (most common output rank; see rank_pattern for others)
    alpha: float  # lora_alpha for that rank
    max_rank: int
    modules: int
    relative_error: float = 0.0
    module_errors: dict[str, float] = field(default_factory=dict)
    quantization_errors: dict[str, float] = field(default_factory=dict)


def lora_factors(rec: ModuleRecord) -> tuple[Tensor, Tensor, float]:
    """A' (2r, in), B' (out, 2r) and alpha' of one module, in the decomposition dtype."""
    dtype = rec.A0.dtype
    a = torch.cat([rec.A.to(dtype), rec.A0], dim=0)
    b = torch.cat([rec.B.to(dtype), -rec.B0], dim=1)
    alpha = rec.alpha * (math.sqrt(2.0) if rec.rslora else 2.0)
    return a, b, alpha


@linalg.on_one_thread  # QR and SVD: the same result whatever the thread count
def compress(a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-k factors of b @ a (out, in) without forming it: A_k (k', in), B_k (out, k'), tail and
    total squared Frobenius norm of b @ a. k' = min(k, rank of the factors' span). Runs in float64."""
    a64, b64 = a.double(), b.double()
    qb, rb = torch.linalg.qr(b64)  # b = qb rb
    qa, ra = torch.linalg.qr(a64.mT)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.mT)  # b a = qb (u s vh) qa^T, qb/qa orthonormal
    k = min(k, s.shape[0])
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root.unsqueeze(1) * (vh[:k] @ qa.mT)
    tail, total = s[k:].square().sum().item(), s.square().sum().item()
    # An untrained adapter has B a = B A - B0 A0 = 0 exactly; its computed s is rounding noise.
    if math.sqrt(total) <= 64 * torch.finfo(torch.float64).eps * b64.norm().item() * a64.norm().item():
        tail = total = 0.0
    return a_k.to(a.dtype), b_k.to(b.dtype), tail, total


def _alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    return scaling * (math.sqrt(rank) if rslora else rank)


def convert_to_lora(
    src: PathLike | nn.Module,
    out_dir: PathLike,
    *,
    prefix: str = PEFT_PREFIX,
    rank: int | None = None,
) -> ConversionReport:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``) for the
    original base weights, equivalent to the PiSSA adapter in ``src`` (a saved file or a live model).

    Args:
        prefix: prepended to each module path in the tensor keys; the PEFT module name is the key
            without "base_model.model.", e.g. prefix "base_model.model.model." for an adapter
            trained on a LlamaModel and served as LlamaForCausalLM.
        rank: cap the output rank at k by a truncated SVD of each module's update (alpha adjusted
            so that the scaling is unchanged); the report gives the relative error introduced.

    Neither ``src`` nor the live model is modified.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise StateError(f"minipissa.convert_to_lora: rank must be an int >= 1, got {rank!r}")
    recs = (
        state.records_of(adapted_layers(src, "convert_to_lora")) if isinstance(src, nn.Module) else state.read(src)[1]
    )
    out = as_path(out_dir, "output directory")
    if out.exists() and not out.is_dir():
        raise StateError(f"minipissa.convert_to_lora: '{out}' exists and is not a directory; give a directory")
    if {r.rslora for r in recs} == {True, False}:
        raise StateError("minipissa.convert_to_lora: some modules use rsLoRA and some do not; PEFT needs one setting")

    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    errors: dict[str, float] = {}
    tail_total = [0.0, 0.0]
    for rec in recs:
        a, b, alpha = lora_factors(rec)
        if rank is not None and rank < a.shape[0]:
            scaling = alpha / (math.sqrt(a.shape[0]) if rec.rslora else a.shape[0])
            a, b, tail, total = compress(a, b, rank)
            alpha = _alpha_for(scaling, a.shape[0], rec.rslora)
            errors[rec.name] = math.sqrt(tail / total) if total > 0 else 0.0
            tail_total[0] += tail * scaling**2
            tail_total[1] += total * scaling**2
        name = (prefix + rec.name).removeprefix(PEFT_PREFIX)
        tensors[f"{prefix}{rec.name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{rec.name}.lora_B.weight"] = b.contiguous()
        ranks[name], alphas[name] = a.shape[0], alpha

    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(a for n, a in alphas.items() if ranks[n] == r).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(ranks),
        "fan_in_fan_out": any(rec.fan_in_fan_out for rec in recs),
        "use_rslora": recs[0].rslora,
        "init_lora_weights": True,  # the weights are in the file: loading must run no SVD
        "lora_dropout": max(rec.dropout for rec in recs),
        "bias": "none",
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != lora_alpha},
        "modules_to_save": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "use_dora": False,
    }
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(config, indent=2) + "\n"

    files = {
        "adapter_model.safetensors": lambda temp: write_safetensors(plain, temp, {"format": "pt"}),
        "adapter_config.json": lambda temp: _write_text(temp, text),
    }  # written together: a reader never sees new tensors beside an old config
    write_once(src if isinstance(src, nn.Module) else None, lambda: atomic_write_dir(out, files))  # rank 0 if sharded
    overall = math.sqrt(tail_total[0] / tail_total[1]) if tail_total[1] > 0 else 0.0
    quantized = {rec.name: float(rec.info["nf4_error"]) for rec in recs if rec.info["quantize"] is not None}
    return ConversionReport(out, r, lora_alpha, max(ranks.values()), len(recs), overall, errors, quantized)


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)
