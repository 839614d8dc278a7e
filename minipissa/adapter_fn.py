"""The adapted linear map as one autograd function: y = x W^T + b + s (x_a A^T) B^T.

Why a custom function rather than a few ``F.linear`` calls: autograd would keep a separate node,
output buffer and saved tensor for each step. Here

- the adapter product is added into the base output in place, with s folded into the GEMM's alpha
  (``addmm_``): no (N, out) temporaries for ``s * ...`` or ``y + ...``;
- A and B are cast to the activation dtype once per forward and the casts are reused in backward;
- only what the gradients need is saved: the adapter input (for dA; the same tensor the neighbouring
  projections save, so q/k/v share it), the rank-r intermediate h (for dB), the frozen weight (for dx,
  a reference, no copy) and the cast A, B. The frozen base needs no weight gradient, so nothing else;
- dx is one GEMM with the adapter's contribution accumulated into it in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class AdaptedLinear(torch.autograd.Function):
    """Forward/backward of ``x W^T + bias + s * (xa A^T) B^T`` with frozen W and bias.

    Shapes: x (..., in); xa (..., in) = dropout(x), or None for x itself (one tensor passed once:
    torch.compile cannot trace a function given the same tensor twice); weight (out, in) (any view);
    bias (out,) or None; a (r, in); b (out, r). A and B may be float32 masters for bf16 activations.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        xa: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scaling: float,
    ) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)
        h = xa2 @ a_c.mT  # (N, r): the only adapter activation kept
        y = F.linear(x2, weight, bias)
        y.addmm_(h, b_c.mT, alpha=scaling)
        ctx.scaling, ctx.shared = scaling, xa is None
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.save_for_backward(xa2 if ctx.needs_input_grad[4] else None, h, weight, a_c, b_c)
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xa2, h, weight, a_c, b_c = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        dx = dxa = da = db = None
        need_x, need_xa, _, _, need_a, need_b, _ = ctx.needs_input_grad
        dh = g @ b_c  # (N, r), without the factor s; small
        if need_x:
            dx = g @ weight
            if ctx.shared:  # xa is x: one (N, in) gradient, the adapter's part accumulated in place
                dx.addmm_(dh, a_c, alpha=s)
            dx = dx.reshape(*grad.shape[:-1], dx.shape[-1])
        if need_xa and not ctx.shared:
            dxa = (s * (dh @ a_c)).reshape(*grad.shape[:-1], a_c.shape[-1])
        if need_a:
            da = (dh.mT @ xa2).to(ctx.a_dtype).mul_(s)
        if need_b:
            db = (g.mT @ h).to(ctx.b_dtype).mul_(s)
        return dx, dxa, None, None, da, db, None


def adapted_linear(
    x: Tensor, xa: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """``x W^T + bias + s (xa A^T) B^T`` (see :class:`AdaptedLinear`); x (..., in) -> (..., out).

    ``xa``: the adapter's input if it differs from x (dropout), else None."""
    out: Tensor = AdaptedLinear.apply(x, xa, weight, bias, a, b, scaling)
    return out
