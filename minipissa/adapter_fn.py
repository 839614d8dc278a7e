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

QPiSSA: ``weight`` is then the NF4 codes of W_res (:class:`QuantizedResidual` says how to read them); it is
dequantized to the activations' dtype in forward and again in backward, so only the 4-bit codes are saved.
Under ``torch.compile`` each dequantization fuses into one kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .nf4 import dequantize

#: torch.mm(..., out_dtype=float32) for bf16/fp16 operands (CUDA, torch >= 2.8): the adapters' float32
#: gradients come straight out of the GEMM, with no separate cast kernel.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_as(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """left @ right, returned in ``dtype`` (a master weight's gradient)."""
    if left.dtype == dtype:
        return torch.mm(left, right)
    if _MM_OUT_DTYPE and left.is_cuda and dtype == torch.float32 and left.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(left, right, out_dtype=dtype)
    return torch.mm(left, right).to(dtype)


class QuantizedResidual(NamedTuple):
    """How to read NF4 codes as the (out, in) weight: the absmax and pair table (nf4.py) of the stored
    ``shape``, transposed for a Conv1D (``fan_in_fan_out``)."""

    absmax: Tensor
    table: Tensor
    shape: tuple[int, ...]
    transposed: bool


def _weight(
    stored: Tensor, absmax: Tensor | None, table: Tensor | None, shape: Any, transposed: bool, dtype: Any
) -> Tensor:
    """The (out, in) weight: ``stored`` itself, or dequantized from its codes."""
    if absmax is None or table is None:
        return stored
    weight = dequantize(stored, absmax, shape, dtype, table)
    return weight.mT if transposed else weight


class AdaptedLinear(torch.autograd.Function):
    """Forward/backward of ``x W^T + bias + s * (xa A^T) B^T`` with frozen W and bias.

    Shapes: x (..., in); xa (..., in) = dropout(x), or None for x itself (one tensor passed once:
    torch.compile cannot trace a function given the same tensor twice); weight (out, in) (any view);
    bias (out,) or None; a (r, in); b (out, r). A and B may be float32 masters for bf16 activations.

    ``a_cast``, ``b_cast``: A and B already in x's dtype (the model's pre-hook casts all adapters
    in one launch, casts.py), or None to cast here.

    ``absmax``, ``table``, ``shape``, ``transposed``: None, or ``weight`` holds NF4 codes (:class:`QuantizedResidual`).

    Kernels per call with s = 1 (the default alpha = r): forward 3 (h = xa A^T, the base GEMM,
    y += h B^T in place; 2 more if A and B are cast here); backward 5 (dh = g B, dx = g W, dx += dh A in place,
    dA = dh^T xa and dB = g^T h, in float32 straight out of the GEMM on CUDA). On a GPU each launch
    costs the host more than the kernel costs the GPU at these skinny shapes, so the count matters.
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
        a_cast: Tensor | None,
        b_cast: Tensor | None,
        absmax: Tensor | None = None,
        table: Tensor | None = None,
        shape: Any = None,
        transposed: bool = False,
    ) -> Tensor:
        codes = weight
        weight = _weight(codes, absmax, table, shape, transposed, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1])
        a_c = a.to(x.dtype) if a_cast is None else a_cast
        b_c = b.to(x.dtype) if b_cast is None else b_cast
        h = torch.mm(xa2, a_c.mT)  # (N, r): the only adapter activation kept
        # The output is allocated in its final shape and filled through a 2-D view, so that what is returned is
        # no view: callers may modify it in place (ReLU(inplace=True), y += 1), and FSDP2 may hook it.
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        y2 = y.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(x2, weight.mT, out=y2)
        else:
            torch.addmm(bias, x2, weight.mT, out=y2)
        y2.addmm_(h, b_c.mT, alpha=scaling)
        ctx.scaling, ctx.shared = scaling, xa is None
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        ctx.quant = shape, transposed
        ctx.save_for_backward(xa2 if ctx.needs_input_grad[4] else None, h, codes, a_c, b_c, absmax, table)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xa2, h, codes, a_c, b_c, absmax, table = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        dx = dxa = da = db = None
        need_x, need_xa, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        dh = torch.mm(g, b_c)  # (N, r)
        if s != 1.0:
            dh.mul_(s)  # s once, on the small tensor: dx, dxa and dA below then carry it
        if need_x:
            shape, transposed = ctx.quant
            dx = torch.mm(g, _weight(codes, absmax, table, shape, transposed, grad.dtype))
            if ctx.shared:  # xa is x: one (N, in) gradient, the adapter's part accumulated in place
                dx.addmm_(dh, a_c)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if need_xa and not ctx.shared:
            dxa = torch.mm(dh, a_c).view(*grad.shape[:-1], a_c.shape[-1])
        if need_a:
            da = _mm_as(dh.mT, xa2, ctx.a_dtype)
        if need_b:
            db = _mm_as(g.mT, h, ctx.b_dtype)
            if s != 1.0:
                db.mul_(s)
        return dx, dxa, None, None, da, db, None, None, None, None, None, None, None


def adapted_linear(
    x: Tensor,
    xa: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scaling: float,
    a_cast: Tensor | None = None,
    b_cast: Tensor | None = None,
    quant: QuantizedResidual | None = None,
) -> Tensor:
    """``x W^T + bias + s (xa A^T) B^T`` (see :class:`AdaptedLinear`); x (..., in) -> (..., out).

    ``xa``: the adapter's input if it differs from x (dropout), else None. ``a_cast``, ``b_cast``:
    A and B already in x's dtype (values, not differentiated: gradients go to ``a`` and ``b``).
    ``quant``: ``weight`` holds the NF4 codes of W_res, read as it says."""
    if quant is None:
        out: Tensor = AdaptedLinear.apply(x, xa, weight, bias, a, b, scaling, a_cast, b_cast)
    else:
        out = AdaptedLinear.apply(x, xa, weight, bias, a, b, scaling, a_cast, b_cast, *quant)
    return out
