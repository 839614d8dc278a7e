"""The adapted linear map: y = x W^T + b + s (x_a A^T) B^T, forward and backward.

A dense residual W takes three plain ops, so that autograd's own (C++) backward computes the gradients:

- h = x_a A^T, the rank-r intermediate (the only adapter activation autograd keeps, beside x and the casts);
- y = x W^T + b, the base GEMM (W frozen: its backward computes dx only);
- y += s h B^T in place, s folded into the GEMM's alpha: no (N, out) temporaries for ``s * ...`` or ``y + ...``.

Kernels with s = 1: 3 forward, 6 backward. A custom Python autograd function does it in 5 backward kernels, but
in eager mode on a GPU the host then spends more time in Python than the GPU spends in the kernels: the plain ops'
step stays GPU-bound, where the Python function's becomes host-bound and slower, and varies from step to step
(figures in benchmarks/README.md).

QPiSSA (:func:`quantized_adapted_linear`): one custom function dequantizes the NF4 codes of W_res in forward and
again in backward, so that only the 4-bit codes are saved (autograd would keep the dequantized weight for dx).
Under ``torch.compile`` each dequantization fuses into one kernel.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.nf4 import NF4Weight, dequantize
from ..core.nf4_stats import decode

#: aten's reshape without view tracking (what torch.matmul returns), or None if a future torch drops it.
_UNSAFE_VIEW = getattr(getattr(torch.ops.aten, "_unsafe_view", None), "default", None)


def _unflatten(y: Tensor, lead: torch.Size) -> Tensor:
    """(N, out) -> (*lead, out), as no view: callers may modify the output in place (ReLU(inplace=True), y += 1),
    also that of a compiled model, and FSDP2 may hook it."""
    if tuple(lead) == tuple(y.shape[:-1]):  # x was (N, in)
        return y
    shape = (*lead, y.shape[-1])
    return y.reshape(shape).clone() if _UNSAFE_VIEW is None else _UNSAFE_VIEW(y, shape)


def _dequantized(
    codes: Tensor, stats: tuple[Tensor, Tensor | None, Tensor | None], table: Tensor, shape: Any, transposed: bool,
    dtype: Any,
) -> Tensor:  # fmt: skip
    absmax, scale, offset = stats
    if scale is not None:  # double-quantized: decoded here, in forward and again in backward
        absmax = decode(absmax, scale, cast(Tensor, offset))
    weight = dequantize(codes, absmax, shape, dtype, table)
    return weight.mT if transposed else weight


# In place in eager mode; out of place when traced by torch.compile, where torch 2.11 lost an in-place update made
# inside this custom function (its input gradients came out zero).
def _add_product(y: Tensor, p: Tensor, q: Tensor, alpha: float) -> Tensor:
    """y + alpha * (p @ q)."""
    return torch.addmm(y, p, q, alpha=alpha) if torch.compiler.is_compiling() else y.addmm_(p, q, alpha=alpha)


def _scale(t: Tensor, s: float) -> Tensor:
    return t * s if torch.compiler.is_compiling() else t.mul_(s)


class QuantizedAdaptedLinear(torch.autograd.Function):
    """Forward/backward of ``x deq(codes)^T + bias + s * (xa A^T) B^T`` with frozen codes and bias.

    Shapes: x (..., in); xa (..., in) = dropout(x), or None for x itself (one tensor passed once: torch.compile
    cannot trace a function given the same tensor twice); codes, absmax, table, shape: the residual's
    :class:`~minipissa.core.nf4.NF4Weight`, ``transposed`` for a Conv1D (stored (in, out)); bias (out,) or None;
    a (r, in), b (out, r) in x's dtype; double-quantized, absmax is its 8-bit codes and ``absmax_scale`` and
    ``absmax_offset`` are given (else None): only those are saved, never the decoded float32 absmax.

    Kernels with s = 1: forward 4 (dequantize, h = xa A^T, the base GEMM, y += h B^T in place); backward 6
    (dequantize, dh = g B, dx = g W, dx += dh A in place, dA = dh^T xa, dB = g^T h).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        xa: Tensor | None,
        codes: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scaling: float,
        absmax: Tensor,
        table: Tensor,
        shape: Any,
        transposed: bool,
        absmax_scale: Tensor | None,
        absmax_offset: Tensor | None,
    ) -> Tensor:
        weight = _dequantized(codes, (absmax, absmax_scale, absmax_offset), table, shape, transposed, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
        h = torch.mm(xa2, a.mT)  # (N, r)
        y = torch.mm(x2, weight.mT) if bias is None else torch.addmm(bias, x2, weight.mT)
        y = _add_product(y, h, b.mT, scaling)
        ctx.scaling, ctx.shared, ctx.quant = scaling, xa is None, (shape, transposed)
        ctx.save_for_backward(
            xa2 if ctx.needs_input_grad[4] else None, h, codes, a, b, absmax, table, absmax_scale, absmax_offset
        )
        return _unflatten(y, x.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xa2, h, codes, a, b, absmax, table, absmax_scale, absmax_offset = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        dx = dxa = da = db = None
        need_x, need_xa, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        dh = torch.mm(g, b)  # (N, r)
        if s != 1.0:
            dh = _scale(dh, s)  # s once, on the small tensor: dx, dxa and dA below then carry it
        if need_x:
            shape, transposed = ctx.quant
            stats = (absmax, absmax_scale, absmax_offset)
            dx = torch.mm(g, _dequantized(codes, stats, table, shape, transposed, grad.dtype))
            if ctx.shared:  # xa is x: one (N, in) gradient, the adapter's part accumulated in place
                dx = _add_product(dx, dh, a, 1.0)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if need_xa and not ctx.shared:
            dxa = torch.mm(dh, a).view(*grad.shape[:-1], a.shape[-1])
        if need_a:
            da = torch.mm(dh.mT, xa2)
        if need_b:
            db = torch.mm(g.mT, h)
            if s != 1.0:
                db = _scale(db, s)
        return dx, dxa, None, None, da, db, None, None, None, None, None, None, None


def adapted_linear(
    x: Tensor, xa: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float
) -> Tensor:
    """``x W^T + bias + s (xa A^T) B^T``; x (..., in) -> (..., out).

    ``xa``: the adapter's input if it differs from x (dropout), else None. ``weight``: (out, in), any view. ``a``
    (r, in), ``b`` (out, r): in x's dtype (the model's one cast of every master, casts.py), or masters of another
    dtype, cast here (differentiably: their gradients come back in the masters' dtype)."""
    a = a if a.dtype == x.dtype else a.to(x.dtype)
    b = b if b.dtype == x.dtype else b.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
    y = F.linear(x2, weight, bias)
    y.addmm_(torch.mm(xa2, a.mT), b.mT, alpha=scaling)
    return _unflatten(y, x.shape[:-1])


def quantized_adapted_linear(
    x: Tensor,
    xa: Tensor | None,
    weight: NF4Weight,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scaling: float,
    transposed: bool,
) -> Tensor:
    """:func:`adapted_linear` with W the dequantized NF4 ``weight`` (its stored shape; ``transposed``: stored
    (in, out), a Conv1D's); the bias gets no gradient."""
    a = a if a.dtype == x.dtype else a.to(x.dtype)
    b = b if b.dtype == x.dtype else b.to(x.dtype)
    absmax, scale, offset = (*weight.statistics(), None, None)[:3]  # (absmax, None, None) unless double-quantized
    out: Tensor = QuantizedAdaptedLinear.apply(
        x, xa, weight.codes, bias, a, b, scaling, absmax, weight.table, weight.shape, transposed, scale, offset
    )
    return out


def corrected_linear(
    x: Tensor,
    xa: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scaling: float,
    d: Tensor,
    c: Tensor,
) -> Tensor:
    """:func:`adapted_linear` over the residual of another adapter, corrected by a frozen low-rank term:
    ``x W^T + bias + (x D^T) C^T + s (xa A^T) B^T``; ``d`` (k, in), ``c`` (out, k) (nn/adapters.py: W + C·D is this
    adapter's own residual, up to rounding). Not the fast path of a model with one adapter: that never has C·D."""
    a, b, c, d = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (a, b, c, d))
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
    y = F.linear(x2, weight, bias)
    y.addmm_(torch.mm(x2, d.mT), c.mT)
    y.addmm_(torch.mm(xa2, a.mT), b.mT, alpha=scaling)
    return _unflatten(y, x.shape[:-1])


def low_rank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``x W^T + bias + s (x A^T) B^T`` by the formula, A and B cast to x's device and dtype: the layer's reference
    road (autocast), ``original()`` (A0, B0) and a correction alone (``disabled()``, s = 1)."""
    y = F.linear(x, weight, bias)
    return y + F.linear(F.linear(x, a.to(x.device, x.dtype)) * scaling, b.to(x.device, x.dtype))
