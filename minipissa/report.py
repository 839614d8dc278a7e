"""summary(): what apply() adapted, how much of each weight the adapter holds, and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .model import pissa_layers


@dataclass
class ModuleSummary:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    scaling: float
    explained_energy: float | None  # ||S_r||^2 / ||W||_F^2 of the initial weight; None for init='lora'
    dead_components: int  # singular values ~0: their rows of A / columns of B get no gradient


@dataclass
class Summary:
    modules: list[ModuleSummary] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    seconds: float | None = None

    def __str__(self) -> str:
        lines = [f"{'module':<40} {'out x in':>12} {'rank':>5} {'energy':>7} {'dead':>5}"]
        for m in self.modules:
            energy = "-" if m.explained_energy is None else f"{m.explained_energy:.3f}"
            shape = f"{m.shape[0]} x {m.shape[1]}"
            lines.append(f"{m.name:<40} {shape:>12} {m.rank:>5} {energy:>7} {m.dead_components:>5}")
        seconds = "" if self.seconds is None else f", init {self.seconds:.2f} s"
        lines.append(
            f"{len(self.modules)} adapted modules; trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable / max(self.total, 1):.3f}%){seconds}"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Adapted modules, parameter counts, init time and per-module explained energy."""
    result = Summary(seconds=model.__dict__.get("_minipissa_seconds"))
    for name, layer in pissa_layers(model):
        sigma = torch.tensor(layer.info.get("singular_values", []), dtype=torch.float64)
        norm = layer.info.get("weight_norm", 0.0)
        energy = (sigma.square().sum() / norm**2).item() if sigma.numel() and norm > 0 else None
        tiny = torch.finfo(layer.A0.dtype).eps * max(layer.in_features, layer.out_features) * norm
        dead = int((sigma <= tiny).sum()) if sigma.numel() else 0
        result.modules.append(
            ModuleSummary(name, (layer.out_features, layer.in_features), layer.rank, layer.scaling, energy, dead)
        )
    params = {id(p): p for p in model.parameters()}.values()
    result.trainable = sum(p.numel() for p in params if p.requires_grad)
    result.total = sum(p.numel() for p in params)
    return result
