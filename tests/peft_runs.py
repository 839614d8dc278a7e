"""PEFT PiSSA runs and crafted copies of their adapter directories, for the tests of import_peft and its CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def peft_pissa_run(build, targets, tmp_path: Path, init: str, lr: float = 1e-2, **lora) -> tuple[nn.Module, Path, Path]:  # type: ignore[no-untyped-def]
    """PEFT's PiSSA: init (saved: the 'pissa_init' adapter), a few AdamW steps (saved: the trained adapter)."""
    import peft

    config = peft.LoraConfig(r=lora.pop("r", 4), lora_alpha=8, target_modules=targets, init_lora_weights=init, **lora)
    model = peft.get_peft_model(build(), config)
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "trained")
    return model.eval(), tmp_path / "init", tmp_path / "trained"


def crafted(
    src: Path, dst: Path, config: Callable[[dict[str, Any]], Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None,
) -> Path:  # fmt: skip
    """A copy of the adapter directory ``src`` with its config and/or tensors edited (in place) by the callables."""
    shutil.copytree(src, dst)
    if config is not None:
        edited = json.loads((dst / "adapter_config.json").read_text())
        config(edited)
        (dst / "adapter_config.json").write_text(json.dumps(edited))
    if tensors is not None:
        edited_tensors = load_file(str(dst / "adapter_model.safetensors"))
        tensors(edited_tensors)
        save_file(edited_tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def zero(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            if key in k:
                t[k] = torch.zeros_like(t[k])

    return edit
