"""QPiSSA: the frozen residual in 4-bit NF4, and the iterations that choose the adapter with the quantizer in view.

    W ~ deq(nf4(W_res)) + s * B A,      W_res = W - s * B0 A0

The decomposition runs in full precision first; only the residual is quantized (the principal part, which
holds the outliers, stays out of the 4 bits). With ``quant_iters`` T > 1 the principal part P = s * B0 A0 is
chosen again from the quantization error of the previous choice (the authors' ``init_qpissa.py``):

    QPiSSA:  P = top_r(W);  T - 1 times:  P = top_r(W - deq(nf4(W - P)))
    LoftQ:   P = 0;         T times:      P = top_r(W - deq(nf4(W - P)))

Every scheme ends with the residual nf4(W - P_final), which a reload rebuilds from W, A0 and B0.

No iteration runs a full SVD: each after the first is a range finder started from the previous choice's row
space plus fresh random columns, with :data:`WARM_NITER` power iterations (:func:`warm_factors`). On the 36
MiniLM matrices at r = 16 that gives the exact top-r of each iteration's input to 4.9e-7 relative (the exact
path's own accuracy is 2.6e-7), where a cold start needs more steps for less.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import decompose, nf4
from .decompose import compute_dtype
from .layer import residual_weight

#: Power iterations of a warm-started choice (see the module docstring: 1 gives 5e-6, 2 and more 4.9e-7).
WARM_NITER = 2

#: top_r(E, previous) -> (A (r, in), B (out, r), S (r,)) of an (out, in) matrix E; ``previous`` is the last
#: choice's A, to start a randomized range finder from (a warm start), or None.
TopR = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor]]


def round_trip(matrix: Tensor, fan_in_fan_out: bool) -> Tensor:
    """deq(nf4(M)) of (out, in) matrices (..., out, in), each quantized on its own in its stored layout (Conv1D:
    (in, out)), as the residual is."""
    stored = (matrix.mT if fan_in_fan_out else matrix).contiguous()
    shape = tuple(stored.shape[-2:])
    if (shape[0] * shape[1]) % nf4.BLOCK:  # blocks would straddle two stacked matrices: one at a time
        back = torch.stack([nf4.dequantize(*nf4.quantize(m), shape, matrix.dtype) for m in stored.view(-1, *shape)])
    else:
        back = nf4.dequantize(*nf4.quantize(stored), tuple(stored.shape), matrix.dtype)
    back = back.view(stored.shape)
    return back.mT if fan_in_fan_out else back


def warm_factors(target: Tensor, previous: Tensor, fresh: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., r, n), B (..., m, r), S (..., r) of the top-r of ``target`` (..., m, n), from a range finder
    started on the rows of the previous choice's A (..., r, n) and the columns of ``fresh`` (..., n, k) past r."""
    rank = previous.shape[-2]
    omega = torch.cat([previous.mT, fresh[..., rank:]], dim=-1)
    return decompose.principal_factors(target, rank, scaling, niter=WARM_NITER, omega=omega)


def alternate(
    matrix: Tensor,
    scaling: float,
    top_r: TopR,
    first: tuple[Tensor, Tensor, Tensor] | None,
    steps: int,
    fan_in_fan_out: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The factors after ``steps`` choices P = top_r(W - deq(nf4(W - P))), from ``first`` (QPiSSA: W's own
    top-r) or from P = 0 (LoftQ: ``first`` None). ``matrix``: W (..., out, in) in the decomposition dtype, one
    weight or a stack of same-shape weights."""
    factors = first
    for _ in range(steps):
        principal = 0.0 if factors is None else scaling * (factors[1] @ factors[0])
        target = matrix - round_trip(matrix - principal, fan_in_fan_out)
        factors = top_r(target, None if factors is None else factors[0])
    if factors is None:
        raise ValueError("qpissa.alternate: no factors (LoftQ needs steps >= 1)")
    return factors


def residual_nf4(weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool) -> nf4.NF4Weight:
    """nf4(W - s * B0 A0), quantized from the factors' dtype (no rounding to the weight's dtype first): the one
    function that makes the 4-bit residual at init and at reload."""
    return _residual_and_nf4(weight, a0, b0, scaling, fan_in_fan_out)[1]


def _residual_and_nf4(
    weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool
) -> tuple[Tensor, nf4.NF4Weight]:
    residual = residual_weight(weight, a0, b0, scaling, fan_in_fan_out, compute_dtype(weight.dtype))
    return residual, nf4.NF4Weight.quantized(residual, weight.dtype)


def quantize_residual(
    weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool, qlora_too: bool = True
) -> tuple[nf4.NF4Weight, Tensor]:
    """:func:`residual_nf4` and what it costs, as a tensor on the weight's device (not read back: no sync), holding
    ``nf4_error`` = ||W - (deq(nf4(W_res)) + s B0 A0)||_F / ||W||_F and, for comparison, QLoRA's ``qlora_error``
    = ||W - deq(nf4(W))||_F / ||W||_F, measured while W is at hand (``qlora_too`` False: the residual is W itself,
    LoRA's init, and the two are one).

    Args:
        weight: the stored full-precision weight, (out, in), or (in, out) when ``fan_in_fan_out``.
        a0: (r, in). b0: (out, r).
    """
    residual, quantized = _residual_and_nf4(weight, a0, b0, scaling, fan_in_fan_out)
    dtype = residual.dtype
    error = torch.linalg.vector_norm(residual - quantized.dequantize(dtype))
    del residual
    qlora = error
    if qlora_too:
        qlora = torch.linalg.vector_norm(weight.to(dtype) - nf4.dequantize(*nf4.quantize(weight), weight.shape, dtype))
    norm = torch.linalg.vector_norm(weight, dtype=dtype).clamp(min=torch.finfo(dtype).tiny)
    return quantized, torch.stack([error, qlora]) / norm


ERRORS = ("nf4_error", "qlora_error")
