"""PiSSA -> LoRA on the ORIGINAL weights, written in PEFT's on-disk adapter layout, safe for serving stacks.

A trained PiSSA layer computes W_res + s·B·A = W - s·B0·A0 + s·B·A = W + s·[B | -B0]·[A ; A0], so
the update of the original W is a LoRA of rank 2r with A' = [A ; A0] (2r, in) and
B' = s·[B | -B0] (out, 2r): the module's scaling s is folded into B'. Optionally ``rank=k`` re-compresses
B'·A' by a truncated SVD to rank k.

Serving stacks read less of the config than PEFT: vLLM applies ONE scaling (``lora_alpha / r``) to every module,
ignores ``rank_pattern`` and ``alpha_pattern``, and checks only the global ``r`` against its ``max_lora_rank``. So
every module is written at one rank R (the largest; smaller ones padded with zero rows of A' and columns of B',
which add exactly nothing) with ``lora_alpha = r = R`` and no rsLoRA: the scaling is 1 for every loader, and no
pattern is needed. Zero padding rather than patterns because a loader that ignores patterns then still computes
the right thing, and it costs only the zeros' storage (none when all ranks agree, the usual case).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core import linalg
from ..core.dtensor import write_once
from ..core.errors import PathLike, StateError, as_path
from ..core.weights import lora_scaling
from ..io import adapter_file as state
from ..io import trained_modules
from ..io.atomic import atomic_write_dir, write_target
from ..io.records import ModuleRecord
from ..io.safefile import write_safetensors
from ..plan.tree import unwrap

PEFT_PREFIX = "base_model.model."
#: vLLM's default ``max_lora_rank``: adapters of higher rank need server flags or ``rank=``.
SERVING_RANK_LIMIT = 16
#: PEFT's task types (peft.TaskType), for ``task_type``.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: The values vLLM accepts for ``max_lora_rank``.
SERVING_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def serving_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank`` (None above 512)."""
    return next((k for k in SERVING_RANKS if k >= rank), None)


def snap_rank(rank: int) -> int:
    """The largest ``max_lora_rank`` value vLLM accepts that is <= ``rank`` (an int >= 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"minipissa: a rank to snap must be an int >= 1, got {rank!r:.40}")
    return max(k for k in SERVING_RANKS if k <= rank)


@dataclass
class ConversionReport:
    """What convert_to_lora() wrote.

    ``rank`` is the adapter's r (every module's, padded) and ``alpha`` its lora_alpha (= r: scaling 1);
    ``serving_rank`` the smallest vLLM ``max_lora_rank`` that serves it. ``relative_error`` is
    ‖ΔW - ΔW_k‖_F / ‖ΔW‖_F over all modules together (0.0 without ``rank=``), ΔW being the exact update B'·A' of
    the original weights; ``module_errors`` per module.

    ``quantization_errors`` (QPiSSA adapters): per module, how far the LoRA on the original weights is from the
    trained 4-bit model: their weights differ by W_res - deq(nf4(W_res)) exactly, reported as
    ‖W_res - deq(nf4(W_res))‖_F / ‖W‖_F (measured at apply), the relative error of the layer outputs for
    inputs spread evenly over directions.
    """

    out_dir: Path
    rank: int
    alpha: float
    serving_rank: int | None
    modules: int
    relative_error: float = 0.0
    module_errors: dict[str, float] = field(default_factory=dict)
    quantization_errors: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)  # trained in full: PEFT loads them, vLLM refuses them
    trained_biases: list[str] = field(default_factory=list)  # modules whose bias was trained: PEFT's bias="lora_only"


def lora_factors(rec: ModuleRecord) -> tuple[Tensor, Tensor]:
    """A' = [A ; A0] (2r, in) and B' = s·[B | -B0] (out, 2r) of one module, in the decomposition dtype: B'·A' is
    the module's update of the original weight."""
    dtype = rec.A0.dtype
    a = torch.cat([rec.A.to(dtype), rec.A0], dim=0)
    b = torch.cat([rec.B.to(dtype), -rec.B0], dim=1) * lora_scaling(rec.alpha, rec.rank, rec.rslora)
    return a, b


@linalg.on_one_thread  # QR and SVD: the same result whatever the thread count
def compress(a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-k factors of b @ a (out, in) without forming it: A_k (k', in), B_k (out, k'), tail and
    total squared Frobenius norm of b @ a. k' = min(k, rank of the factors' span). Runs in float64."""
    qb, core, qa = linalg.product_core(a, b)
    u, s, vh = torch.linalg.svd(core)  # b a = qb (u s vh) qa^T, qb/qa orthonormal
    k = min(k, s.shape[0])
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root
    a_k = root.unsqueeze(1) * (vh[:k] @ qa.mT)
    tail, total = s[k:].square().sum().item(), s.square().sum().item()
    # An untrained adapter has B a = B A - B0 A0 = 0 exactly; its computed s is rounding noise.
    if math.sqrt(total) <= 64 * torch.finfo(torch.float64).eps * b.double().norm().item() * a.double().norm().item():
        tail = total = 0.0
    return a_k.to(a.dtype), b_k.to(b.dtype), tail, total


def convert_to_lora(
    src: PathLike | nn.Module,
    out_dir: PathLike,
    *,
    prefix: str = PEFT_PREFIX,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    name: str | None = None,
) -> ConversionReport:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json`` and a ``README.md``
    model card) for the original base weights, equivalent to the PiSSA adapter in ``src`` (a saved file or a
    live model), in the layout every loader reads alike (module docstring): one rank, scaling 1, no patterns.

    Args:
        prefix: prepended to each module path in the tensor keys; the PEFT module name is the key
            without "base_model.model.", e.g. prefix "base_model.model.model." for an adapter
            trained on a LlamaModel and served as LlamaForCausalLM.
        rank: cap the output rank at k by a truncated SVD of each module's update; the report gives the
            relative error introduced (:func:`snap_rank` gives a value vLLM accepts).
        base_model_name_or_path: written into the config as PEFT does.
        task_type: written into the config as PEFT does (e.g. "CAUSAL_LM").
        name: which adapter of a live model with several (default: the active one).

    Neither ``src`` nor the live model is modified.
    """
    _check_options(prefix, rank, base_model_name_or_path, task_type)
    recs, full = _records(src, name)
    out = as_path(out_dir, "output directory")
    write_target(out, "directory")  # checked before the work: a file in the way, the working directory, ...
    factors, errors, overall = _lora_of(recs, rank)
    r = max(a.shape[0] for a, _ in factors.values())
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in factors.items():  # one rank for every loader: zero rows of A', columns of B'
        pad = r - a.shape[0]
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    for name, params in full.items():  # PEFT's modules_to_save: saved under the module's own keys
        tensors.update({f"{prefix}{name}.{p}": t for p, t in params.items()})
    biases = {rec.name: rec.bias for rec in recs if rec.bias is not None}  # PEFT's bias="lora_only" keys
    tensors.update({f"{prefix}{name}.base_layer.bias": bias for name, bias in biases.items()})
    lora, trained_in_full = [prefix + name for name in factors], [prefix + name for name in full]
    config = _peft_config(recs, r, lora, trained_in_full, bool(biases), task_type, base_model_name_or_path)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(config, indent=2) + "\n"
    quantized = {rec.name: float(rec.info["nf4_error"]) for rec in recs if rec.info["quantize"] is not None}
    report = ConversionReport(
        out, r, float(r), serving_rank(r), len(recs), overall, errors, quantized, sorted(full), sorted(biases)
    )
    card = model_card(report, recs, base_model_name_or_path, rank)
    files = {
        "adapter_model.safetensors": lambda temp: write_safetensors(plain, temp, {"format": "pt"}),
        "adapter_config.json": lambda temp: _write_text(temp, text),
        "README.md": lambda temp: _write_text(temp, card),
    }  # written together: a reader never sees new tensors beside an old config
    write_once(src if isinstance(src, nn.Module) else None, lambda: atomic_write_dir(out, files))  # rank 0 if sharded
    return report


def _check_options(prefix: str, rank: int | None, base: str | None, task_type: str | None) -> None:
    """A StateError for an option of :func:`convert_to_lora` of the wrong type or value, before any work."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise StateError(f"minipissa.convert_to_lora: rank must be an int >= 1, got {rank!r}")
    if not isinstance(prefix, str) or not (prefix == "" or prefix.endswith(".")):
        raise StateError(
            f"minipissa.convert_to_lora: prefix must be a str ending in '.' (prepended to module paths, e.g. "
            f"{PEFT_PREFIX!r}) or '', got {prefix!r:.60}"
        )
    for name, value in (("base_model_name_or_path", base), ("task_type", task_type)):
        if value is not None and not isinstance(value, str):
            raise StateError(f"minipissa.convert_to_lora: {name} must be a string or None, got {value!r}")
    if task_type is not None and task_type not in TASK_TYPES:  # PEFT fails to load a task type it does not know
        raise StateError(f"minipissa.convert_to_lora: task_type must be None or one of {TASK_TYPES}, got {task_type!r}")


def _records(src: PathLike | nn.Module, name: str | None) -> tuple[list[ModuleRecord], dict[str, dict[str, Tensor]]]:
    """The module records of ``src`` (a saved file or a live model) and its modules trained in full (by module
    name: parameter name -> tensor); a StateError if a residual was edited since apply (no LoRA gives the model)."""
    meta: Any
    if isinstance(src, nn.Module):
        recs, full_tensors, meta = state.adapter_records(unwrap(src, "convert_to_lora"), name, "convert_to_lora")
    else:
        if name is not None:
            raise StateError("minipissa.convert_to_lora: name= picks an adapter of a live model; a file holds one")
        info, recs, full_tensors = state.read(src)
        meta = info.get("trained")
    full, _ = trained_modules.unpack(meta, dict(full_tensors), f"minipissa.convert_to_lora('{src}')")
    edited = [rec.name for rec in recs if rec.info.get("residual_edited")]
    if edited:
        raise StateError(
            f"minipissa.convert_to_lora: the residual of module(s) {edited[:5]} was edited after apply() (in place, by "
            "a cast a reload cannot repeat, or by replacing A0/B0), so no LoRA on the original weights gives the "
            "trained model; nothing was written. Serve the PiSSA model itself (save_residual + the adapter)"
        )
    return list(recs), full


def _lora_of(
    recs: list[ModuleRecord], rank: int | None
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float], float]:
    """Each module's LoRA on the original weight, A' (k, in) and B' (out, k) (:func:`lora_factors`, re-compressed
    to ``rank`` where it is larger), with each compressed module's relative error and the overall one."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    tail_total = [0.0, 0.0]
    for rec in recs:
        a, b = lora_factors(rec)
        if rank is not None and rank < a.shape[0]:
            a, b, tail, total = compress(a, b, rank)
            errors[rec.name] = math.sqrt(tail / total) if total > 0 else 0.0
            tail_total[0] += tail
            tail_total[1] += total
        factors[rec.name] = a, b
    overall = math.sqrt(tail_total[0] / tail_total[1]) if tail_total[1] > 0 else 0.0
    return factors, errors, overall


def _peft_config(
    recs: list[ModuleRecord], r: int, lora: list[str], full: list[str], biases: bool, task: str | None, base: str | None
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` of the converted adapter (``lora``, ``full``: the prefixed module paths of the
    LoRA modules and of the modules trained in full)."""
    return {
        "peft_type": "LORA",
        "task_type": task,
        "r": r,
        "lora_alpha": r,  # scaling lora_alpha / r = 1: each module's own s is in its B'
        "target_modules": sorted(name.removeprefix(PEFT_PREFIX) for name in lora),
        "fan_in_fan_out": any(rec.fan_in_fan_out for rec in recs),
        "use_rslora": False,
        "init_lora_weights": True,  # the weights are in the file: loading must run no SVD
        "lora_dropout": max(rec.dropout for rec in recs),
        "bias": "lora_only" if biases else "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": sorted(name.removeprefix(PEFT_PREFIX) for name in full) or None,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "use_dora": False,
    }


def model_card(report: ConversionReport, recs: list[ModuleRecord], base: str | None, rank: int | None) -> str:
    """A short README.md for the adapter directory, as PEFT writes one: library, base model, rank, how it was
    made, the conversion's error."""
    ranks = sorted({rec.rank for rec in recs})
    serve = f"`--max-lora-rank {report.serving_rank}`" if report.serving_rank else "a rank above vLLM's largest (512)"
    lines = [
        "---",
        f"base_model: {base}" if base else "base_model: null",
        "library_name: peft",
        "tags: [lora, pissa, minipissa]",
        "---",
        "",
        "# LoRA adapter converted from a PiSSA adapter",
        "",
        f"Converted by minipissa {state.library_version()} from a PiSSA adapter of rank {', '.join(map(str, ranks))} "
        f"({report.modules} modules) into a LoRA for the original base weights: A' = [A ; A0], "
        "B' = s·[B | -B0] (the scaling folded into B').",
        "",
        f"- r = lora_alpha = {report.rank} for every module (smaller ones padded with zeros), no rsLoRA, no "
        "rank or alpha patterns: PEFT, vLLM, SGLang and TGI compute the same outputs.",
        f"- Serving with vLLM needs {serve}.",
    ]
    if rank is not None:
        lines.append(
            f"- Re-compressed to rank <= {rank}: relative error of the weight update {report.relative_error:.3g}."
        )
    else:
        lines.append("- Exact: the same outputs as the trained PiSSA model, up to float32 rounding.")
    if report.modules_to_save:
        lines.append(
            f"- Modules trained in full (`modules_to_save`): {', '.join(report.modules_to_save)}. PEFT loads them; "
            "vLLM refuses adapters with modules_to_save."
        )
    if report.trained_biases:
        lines.append(
            f"- Biases trained beside the adapter (PEFT's `bias: lora_only`): {', '.join(report.trained_biases)}. PEFT "
            "loads them; a loader that reads only lora_A and lora_B leaves them out."
        )
    if report.quantization_errors:
        mean = sum(report.quantization_errors.values()) / len(report.quantization_errors)
        lines.append(
            f"- Trained as QPiSSA (4-bit residual): on the 16-bit base this LoRA differs from the trained model by the "
            f"residual's quantization error, {mean:.3g} of ||W|| (mean over modules)."
        )
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)
