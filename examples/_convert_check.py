"""Save the trained PiSSA adapter, convert it to a PEFT-layout LoRA for the ORIGINAL weights, reload that LoRA onto
the original model with a few lines of plain torch (no peft), and measure how far its outputs are from PiSSA's.

The conversion is exact in real arithmetic (W_res + s·B·A = W + s·[B | -B0]·[A ; A0]), so the difference is
float32 rounding only.
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import minipissa


def load_lora_onto(original: nn.Module, lora_dir: str, prefix: str = "base_model.model.") -> nn.Module:
    """A copy of ``original`` with a PEFT-layout LoRA merged in: W += lora_alpha / r · B A (/ sqrt(r): rsLoRA)."""
    with open(os.path.join(lora_dir, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    model = copy.deepcopy(original)
    merged = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(prefix) : -len(".lora_A.weight")]
        b = tensors[f"{prefix}{path}.lora_B.weight"]
        layer = model.get_submodule(path)
        delta = scaling * (b.double() @ a.double())  # (out, in)
        if config.get("fan_in_fan_out"):
            delta = delta.T
        with torch.no_grad():
            layer.weight += delta.to(layer.weight)
        merged += 1
    print(f"reloaded the converted LoRA (r = {r}, lora_alpha = {config['lora_alpha']}) onto {merged} original layers")
    return model


@torch.no_grad()
def check_conversion(trained: nn.Module, original: nn.Module, sample: Tensor, out: str, stem: str) -> float:
    """Largest |logit difference| between the trained PiSSA model and original + converted LoRA on ``sample``."""
    if not hasattr(minipissa, "convert_to_lora"):
        print("this minipissa has no save/convert_to_lora yet: skipped the conversion check")
        return float("nan")
    adapter_path = os.path.join(out, f"{stem}_pissa_adapter.safetensors")
    lora_dir = os.path.join(out, f"{stem}_lora_converted")
    minipissa.save(trained, adapter_path)
    print(f"saved the PiSSA adapter to {adapter_path} ({os.path.getsize(adapter_path) / 1e6:.2f} MB)")
    report = minipissa.convert_to_lora(adapter_path, lora_dir)
    print(
        f"converted it to a PEFT-layout LoRA for the original weights in {lora_dir}: {report.modules} modules, "
        f"rank {report.rank} (= 2r: [B | -B0] [A ; A0]), lora_alpha {report.alpha:g}"
    )
    reloaded = load_lora_onto(original, lora_dir)
    trained.eval()
    reloaded.eval()
    expected = trained(sample).double()
    got = reloaded(sample).double()
    diff = (expected - got).abs().max().item()
    print(
        f"largest output (logit) difference, trained PiSSA vs original + converted LoRA: {diff:.3g} "
        f"(logits are up to {expected.abs().max().item():.3g} in size)"
    )
    return diff
