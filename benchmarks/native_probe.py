"""A probe, not the library: PiSSA layers computed with autograd's own (C++) backward instead of minipissa's fused
Python autograd function, to measure what the Python function costs the host in an eager step.

Per forward, one differentiable cast of every float32 master to the activations' dtype (``CastAll``, one launch
forward and one backward for the whole model); per layer y = x W^T (+ bias), then y += s (x A^T) B^T in place.
Kernels per adapter: 3 forward, 6 backward (the fused function: 3 and 5), but no Python in the backward.
Dense residuals only; no dropout, merge or modes (the benchmark needs none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import minipissa


class CastAll(torch.autograd.Function):
    """masters (float32) -> views of one buffer in ``dtype``; gradients cast back in one launch."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *masters: Tensor) -> tuple[Tensor, ...]:
        sizes = [t.numel() for t in masters]
        flat = torch.empty(sum(sizes), dtype=dtype, device=masters[0].device)
        views = [piece.view(t.shape) for piece, t in zip(flat.split(sizes), masters, strict=True)]
        torch._foreach_copy_(views, list(masters))
        ctx.sizes, ctx.shapes, ctx.master_dtype = sizes, [t.shape for t in masters], masters[0].dtype
        return tuple(views)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        flat = torch.zeros(sum(ctx.sizes), dtype=ctx.master_dtype, device=grads[0].device)
        views = [p.view(s) for p, s in zip(flat.split(ctx.sizes), ctx.shapes, strict=True)]
        present = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
        torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
        return (None, *views)


def native(model: nn.Module) -> nn.Module:
    """Every PiSSA layer of ``model`` switched to the native composition (in place); returns ``model``."""
    layers = [layer for _, layer in minipissa.pissa_layers(model)]
    casts: dict[int, tuple[Tensor, Tensor]] = {}

    def cast_all(module: nn.Module, args: Any) -> None:
        dtype = layers[0].weight.dtype
        masters = [t for layer in layers for t in (layer.A, layer.B)]
        views = CastAll.apply(dtype, *masters)
        for i, layer in enumerate(layers):
            casts[id(layer)] = (views[2 * i], views[2 * i + 1])

    def release(module: nn.Module, args: Any, output: Any) -> None:
        casts.clear()

    for layer in layers:
        if layer.shared_casts is not None:
            layer.shared_casts.remove()
            layer.shared_casts = None

        def forward(x: Tensor, layer: nn.Module = layer) -> Tensor:
            a_c, b_c = casts[id(layer)]
            x2 = x.reshape(-1, x.shape[-1])
            y = F.linear(x2, layer.weight, layer.bias)
            y.addmm_(torch.mm(x2, a_c.mT), b_c.mT, alpha=layer.scaling)
            return y.view(*x.shape[:-1], y.shape[-1])

        layer.forward = forward  # type: ignore[method-assign]  # probe only
    model.register_forward_pre_hook(cast_all)
    model.register_forward_hook(release, always_call=True)
    return model
