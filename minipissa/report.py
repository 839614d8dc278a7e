"""summary(): what apply() adapted, how much of each weight the adapter holds, parameter counts, and for QPiSSA
the residual's bits per parameter and quantization error."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .core.decompose import explained_energy
from .core.errors import as_module
from .core.nf4 import BYTES_PER_PARAM, DQ_BYTES_PER_PARAM, NF4Weight
from .core.table import table
from .plan import named
from .plan.trained import init_seconds
from .plan.tree import pissa_layers, unwrap


@dataclass
class ModuleSummary:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    scaling: float
    explained_energy: float | None  # ||S_r||^2 / ||W||_F^2 of the initial weight; None for init='lora'
    dead_components: int  # singular values ~0: their rows of A / columns of B get no gradient
    residual_bits: float  # bits per parameter of the stored residual: its dtype's, or NF4's 4.5 (4.13 double-quantized)
    quant_error: float | None = None  # QPiSSA: ||W_res - deq(nf4(W_res))||_F / ||W||_F at apply
    qlora_error: float | None = None  # QLoRA's for comparison: ||W - deq(nf4(W))||_F / ||W||_F
    quantizer: str | None = None  # QPiSSA: "nf4", or "nf4+dq" (the absmax double-quantized, in 8 bits)
    residual_bytes: int | None = None  # QPiSSA: bytes of the stored codes and statistics


@dataclass
class Summary:
    modules: list[ModuleSummary] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    seconds: float | None = None
    adapters: list[str] = field(default_factory=list)  # every named adapter (minipissa.adapters() has their settings)
    active: str | None = None  # the one the model computes; each module's row shows the adapter the layer holds

    def __str__(self) -> str:
        quantized = any(m.quant_error is not None for m in self.modules)
        header = ["module", "out x in", "rank", "energy", "dead"]
        header += ["quant", "bits", "q-error", "QLoRA"] if quantized else []
        rows = []
        for m in self.modules:
            energy = "-" if m.explained_energy is None else f"{m.explained_energy:.3f}"
            row = [m.name, f"{m.shape[0]} x {m.shape[1]}", str(m.rank), energy, str(m.dead_components)]
            if quantized:
                errors = ["-" if e is None else f"{e:.4f}" for e in (m.quant_error, m.qlora_error)]
                row += [m.quantizer or "-", f"{m.residual_bits:.2f}", *errors]
            rows.append(row)
        lines = table(header, rows)
        stored = [m for m in self.modules if m.residual_bytes is not None]
        if stored:
            kinds = "/".join(sorted({str(m.quantizer) for m in stored}))
            weights = sum(m.shape[0] * m.shape[1] for m in stored)
            total = sum(m.residual_bytes or 0 for m in stored)
            lines.append(f"4-bit residuals ({kinds}): {len(stored)} modules, {total:,} bytes ({total / weights:.4f} "
                         "bytes per weight)")  # fmt: skip
        seconds = "" if self.seconds is None else f", init {self.seconds:.2f} s"
        if len(self.adapters) > 1:
            lines.append("adapters: " + ", ".join(a + " (active)" * (a == self.active) for a in self.adapters))
        lines.append(
            f"{len(self.modules)} adapted modules; trainable {self.trainable:,} of {self.total:,} parameters "
            f"({100 * self.trainable / max(self.total, 1):.3f}%){seconds}"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Adapted modules, parameter counts, init time and per-module explained energy."""
    as_module(model, "summary")
    model = unwrap(model, "summary")
    result = Summary(seconds=init_seconds(model))  # held by the layers (trained.Run): copies keep it
    result.adapters, result.active = named.adapter_names(model), named.active(model)
    for name, layer in pissa_layers(model):
        sigma = torch.tensor(layer.info.get("singular_values", []), dtype=torch.float64)
        norm = layer.info.get("weight_norm", 0.0)
        energy = explained_energy(sigma.tolist(), norm)
        tiny = torch.finfo(layer.A0.dtype).eps * max(layer.in_features, layer.out_features) * norm
        dead = int((sigma <= tiny).sum()) if sigma.numel() else 0
        q = layer.weight if isinstance(layer.weight, NF4Weight) else None
        bits = 8.0 * layer.weight.dtype.itemsize
        if q is not None:
            bits = 8 * (DQ_BYTES_PER_PARAM if q.double_quant else BYTES_PER_PARAM)
        result.modules.append(
            ModuleSummary(
                name,
                (layer.out_features, layer.in_features),
                layer.rank,
                layer.scaling,
                energy,
                dead,
                bits,
                layer.info.get("nf4_error"),
                layer.info.get("qlora_error"),
                None if q is None else ("nf4+dq" if q.double_quant else "nf4"),
                None if q is None else q.bytes,
            )  # fmt: skip
        )
    params = {id(p): p for p in model.parameters()}.values()
    result.trainable = sum(p.numel() for p in params if p.requires_grad)
    # A 4-bit residual is held in buffers, not parameters: counted as the weight it stands for.
    quantized = sum(layer.in_features * layer.out_features for _, layer in pissa_layers(model) if layer.quantized)
    result.total = sum(p.numel() for p in params) + quantized
    return result
