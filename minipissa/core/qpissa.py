"""QPiSSA: the frozen residual in 4-bit NF4, and the iterations that choose the adapter with the quantizer in view.

    W ~ deq(nf4(W_res)) + s * B A,      W_res = W - s * B0 A0

The decomposition runs in full precision first; only the residual is quantized (the principal part, which
holds the outliers, stays out of the 4 bits). With ``quant_iters`` T > 1 the principal part P = s * B0 A0 is
chosen again from the quantization error of the previous choice (the authors' ``init_qpissa.py``):

    QPiSSA:  P = top_r(W);  T - 1 times:  P = top_r(W - deq(nf4(W - P)))
    LoftQ:   P = 0;         T times:      P = top_r(W - deq(nf4(W - P)))

Every scheme ends with the residual nf4(W - P_final), which a reload rebuilds from W, A0 and B0. With
``double_quant`` (the absmax in 8 bits, nf4_stats.py), nf4 above is that quantizer throughout: the iterations choose
the adapter against what is stored, and the errors measured are those of what is stored.

No iteration runs a full SVD: each after the first is a range finder started from the previous choice's row
space plus fresh random columns, with :data:`WARM_NITER` power iterations (:func:`warm_factors`). Each choice's
input is close to the last one's, so a warm start reaches the exact top-r to about the exact path's own accuracy,
where a cold start needs more steps for less (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import decompose, nf4, nf4_stats
from .decompose import compute_dtype
from .weights import residual_weight

#: Power iterations of a warm-started choice: the fewest that reach the exact path's accuracy (module docstring).
WARM_NITER = 2

#: cold(E) -> (A (..., r, in), B (..., out, r), S (..., r)): the top-r of (..., out, in) matrices E from no previous
#: choice (the caller's exact or randomized decomposition).
Cold = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


#: Elements of the stored weight handled per step of :func:`quantization_target` (a multiple of the NF4 block):
#: bounds its temporaries to a few 32 MiB buffers, whatever the weight's size.
SLICE = 1 << 23


def roundtrip(weight: Tensor, double_quant: bool, dtype: torch.dtype) -> Tensor:
    """deq(nf4(weight)) in ``dtype`` (computed in float32), its absmax double-quantized or not: what
    :class:`~minipissa.core.nf4.NF4Weight` stores and dequantizes."""
    codes, absmax = nf4.quantize(weight)
    if double_quant:
        absmax = nf4_stats.decode(*nf4_stats.encode(absmax))
    return nf4.dequantize(codes, absmax, tuple(weight.shape), dtype)


def quantization_target(
    matrix: Tensor,
    factors: tuple[Tensor, Tensor] | None,
    scaling: float,
    fan_in_fan_out: bool,
    double_quant: bool = False,
) -> Tensor:
    """W - deq(nf4(W - s B A)) of (out, in) matrices (..., out, in), each quantized on its own in its stored layout
    (Conv1D: (in, out)) as the residual is; ``factors`` (A (..., r, in), B (..., out, r)) or None for P = 0.

    Computed a slice of stored rows at a time (slices start on NF4 block boundaries, double-quantized on boundaries
    of groups of 256 blocks, so the blocks and groups are those of the whole weight): besides W, only the result is
    weight-sized.
    """
    stored = matrix.mT if fan_in_fan_out else matrix
    rows, cols = stored.shape[-2:]
    target = torch.empty(stored.shape, dtype=matrix.dtype, device=matrix.device)
    granule = nf4.BLOCK * (nf4_stats.GROUP if double_quant else 1)
    step = granule // math.gcd(cols, granule)  # rows per slice: a multiple of this starts on a block (group) boundary
    per_slice = max(step, SLICE // cols // step * step)
    w3, t3 = stored.reshape(-1, rows, cols), target.view(-1, rows, cols)
    if factors is not None:  # the stored layout's principal part, a row slice at a time: s * left[rows] @ right
        a, b = factors
        left, right = (a.mT, b.mT) if fan_in_fan_out else (b, a)
        left, right = left.reshape(-1, *left.shape[-2:]), right.reshape(-1, *right.shape[-2:])
    for k in range(w3.shape[0]):
        for start in range(0, rows, per_slice):
            w = w3[k, start : start + per_slice]
            d = w if factors is None else w - scaling * (left[k, start : start + per_slice] @ right[k])
            back = roundtrip(d, double_quant, d.dtype)
            torch.sub(w, back, out=t3[k, start : start + per_slice])
    return target.mT if fan_in_fan_out else target


def warm_factors(target: Tensor, previous: Tensor, fresh: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., r, n), B (..., m, r), S (..., r) of the top-r of ``target`` (..., m, n), from a range finder
    started on the rows of the previous choice's A (..., r, n) and the columns of ``fresh`` (..., n, k) past r."""
    rank = previous.shape[-2]
    omega = torch.cat([previous.mT, fresh[..., rank:]], dim=-1)
    return decompose.principal_factors(target, rank, scaling, niter=WARM_NITER, omega=omega)


def alternate(
    matrix: Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    quant_iters: int,
    first: tuple[Tensor, Tensor, Tensor] | None,
    fresh: Tensor | None,
    cold: Cold | None = None,
    double_quant: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., r, in), B (..., out, r), S (..., r) after ``quant_iters`` choices in all (module docstring): from
    ``first``, W's own top-r (QPiSSA: ``quant_iters - 1`` choices against the quantizer follow), or from P = 0
    (LoftQ, ``first`` None: ``quant_iters`` choices follow). ``matrix``: W (..., out, in) in the decomposition dtype,
    one weight or a stack of same-shape weights.

    Each choice after a previous one is warm-started (:func:`warm_factors`) from the sketch ``fresh`` (..., in, k);
    a choice with no previous one, or every choice if ``fresh`` is None, is ``cold(target)``. ``double_quant``: the
    quantizer chosen against holds its absmax in 8 bits, as the residual will.
    """
    factors = first
    for _ in range(quant_iters - (first is not None)):
        previous = None if factors is None else factors[:2]
        target = quantization_target(matrix, previous, scaling, fan_in_fan_out, double_quant)
        if factors is not None and fresh is not None:
            factors = warm_factors(target, factors[0], fresh, scaling)
        elif cold is not None:
            factors = cold(target)
        else:
            raise ValueError("qpissa.alternate: a choice with no warm start needs `cold`")
        del target
    if factors is None:
        raise ValueError("qpissa.alternate: no factors (LoftQ needs quant_iters >= 1)")
    return factors


def residual_nf4(
    weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool, double_quant: bool = False
) -> nf4.NF4Weight:
    """nf4(W - s * B0 A0), quantized from the factors' dtype (no rounding to the weight's dtype first): the one
    function that makes the 4-bit residual at init and at reload; ``double_quant``: its absmax in 8 bits."""
    return _residual_and_nf4(weight, a0, b0, scaling, fan_in_fan_out, double_quant)[1]


def _residual_and_nf4(
    weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, fan_in_fan_out: bool, double_quant: bool
) -> tuple[Tensor, nf4.NF4Weight]:
    residual = residual_weight(weight, a0, b0, scaling, fan_in_fan_out, compute_dtype(weight.dtype))
    return residual, nf4.NF4Weight.quantized(residual, weight.dtype, double_quant)


def quantize_residual(
    weight: Tensor,
    a0: Tensor,
    b0: Tensor,
    scaling: float,
    fan_in_fan_out: bool,
    qlora_too: bool = True,
    double_quant: bool = False,
) -> tuple[nf4.NF4Weight, Tensor]:
    """:func:`residual_nf4` and what it costs, as a tensor on the weight's device (not read back: no sync), holding
    ``nf4_error`` = ||W - (deq(nf4(W_res)) + s B0 A0)||_F / ||W||_F and, for comparison, QLoRA's ``qlora_error``
    = ||W - deq(nf4(W))||_F / ||W||_F, measured while W is at hand (``qlora_too`` False: the residual is W itself,
    LoRA's init, and the two are one). ``double_quant``: nf4 is the double-quantized quantizer in both (QLoRA's own
    default), so that the two compare what each would store.

    Args:
        weight: the stored full-precision weight, (out, in), or (in, out) when ``fan_in_fan_out``.
        a0: (r, in). b0: (out, r).
    """
    residual, quantized = _residual_and_nf4(weight, a0, b0, scaling, fan_in_fan_out, double_quant)
    dtype = residual.dtype
    error = torch.linalg.vector_norm(residual - quantized.dequantize(dtype))
    del residual
    qlora = error
    if qlora_too:
        qlora = torch.linalg.vector_norm(weight.to(dtype) - roundtrip(weight, double_quant, dtype))
    norm = torch.linalg.vector_norm(weight, dtype=dtype).clamp(min=torch.finfo(dtype).tiny)
    return quantized, torch.stack([error, qlora]) / norm


ERRORS = ("nf4_error", "qlora_error")
