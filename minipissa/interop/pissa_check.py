"""Whether initial factors A0 (r, in), B0 (out, r) are a PiSSA init of a weight W (out, in): what
:func:`minipissa.import_peft` asks of an initial adapter made elsewhere, before it rebuilds W_res = W - s·B0·A0.

Every PiSSA init, exact or randomized, makes s·B0·A0 an orthogonal projection of W: exact, U_r U_rᵀ W (onto W's
top-r singular subspaces, both sides); randomized (``torch.svd_lowrank``, PEFT's ``pissa_niter_K``), Q Qᵀ W for
the orthonormal basis Q of its sketch, on the side of W's longer dimension. So the residual R = W - s·B0·A0 has
nothing left along the factors on that side: B0ᵀ R = 0 (or R A0ᵀ = 0) up to the rounding of the factors. Factors
of another weight (another checkpoint, or PEFT's residual model given as the base), other scalings, and factors
that trained since (the initial and trained directories swapped) leave a part of R along them; zero factors
(LoRA's init) leave none, but are zero. An exact init must also remove W's top r (Eckart-Young, from a power
iteration); a randomized one need not (q = r: it may miss some), which is the limit of what can be asked of it.
Trained factors that moved by less than the rounding's tolerance are told apart by comparison with the trained
adapter, which is then the cleaner init. The checks are r x in / out x r products and matrix-vector products:
no SVD of W.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import StateError
from ..core.linalg import product_singular_values

#: The floor of the rounding assumed in float32 factors: TF32's unit roundoff. PEFT's init may run its products on
#: TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision("high")``), and a
#: CUDA float32 SVD is itself less orthogonal than float32's eps (measured), so u = 2^-24 would be too tight.
TF32_ROUNDOFF = 2.0**-11


def tolerance(dtype: torch.dtype) -> float:
    """The largest leak (see :func:`leak`) that rounding leaves in a genuine init stored in ``dtype``.

    With factors rounded to relative error u (the storage dtype's unit roundoff, floored at TF32's for the
    products that made them), first-order perturbation of B0ᵀ(W - s·B0·A0) = 0 gives three terms, each at most
    u·‖B0‖_F·‖W‖_F (for PiSSA factors ‖s·B0‖₂‖A0‖₂ = σ₁ <= ‖W‖ and ‖A0‖_F = ‖B0‖_F): leak <= 3u, so 4u.
    Genuine PEFT inits, on the CPU and on a GPU at every matmul precision, leak far less than 4u (benchmarks/README.md,
    "Figures behind the code"). Trained factors leak more with every step, and a few steps stay under the
    tolerance, so a tolerance alone does not tell an init from a trained adapter: the comparison with the trained
    adapter in :func:`check_pissa_init` does.
    """
    return 4 * max(torch.finfo(dtype).eps / 2, TF32_ROUNDOFF)


def leak(weight: Tensor, a0: Tensor, b0: Tensor, scaling: float, both: bool) -> float:
    """How much of R = W - s·B0·A0 lies along the factors, relative: ‖B0ᵀR‖ / (‖B0‖‖W‖) and ‖R A0ᵀ‖ / (‖A0‖‖W‖)
    (Frobenius), the larger of the two if ``both`` (an exact init projects on both sides), else the smaller.

    All float64 (out, in), (r, in), (out, r) tensors on one device; 0 for a zero factor (0 / 0).
    """
    left = (b0.mT @ weight - scaling * (b0.mT @ b0) @ a0).norm() / (b0.norm() * weight.norm())
    right = (weight @ a0.mT - scaling * b0 @ (a0 @ a0.mT)).norm() / (a0.norm() * weight.norm())
    sides = torch.stack([left, right]).nan_to_num(0.0, posinf=math.inf)
    return float(sides.max() if both else sides.min())


def check_pissa_init(
    name: str,
    weight: Tensor,
    a0: Tensor,
    b0: Tensor,
    scaling: float,
    exact: bool,
    trained: tuple[Tensor, Tensor],
    where: str,
) -> None:
    """Refuse (StateError naming ``name``) initial factors that are not a PiSSA init of ``weight``.

    Args:
        weight: W as (out, in), any float dtype. a0 (r, in), b0 (out, r): the initial factors as stored (their
            dtype sets the tolerance). ``exact``: an exact init (both sides projected, W's top r removed).
        trained: A (r, in), B (out, r) of the trained adapter: if they are a cleaner init than (a0, b0), the
            initial and trained adapters were swapped.
    """
    tol = tolerance(a0.dtype)
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise StateError(f"{where}: the base weight of module '{name}' holds NaN or infinite values")
    a, b = a0.to(w), b0.to(w)
    what = f"{where}: the initial adapter's factors of module '{name}' are not a PiSSA init of this base weight"
    given = leak(w, a, b, scaling, exact)
    if not given <= tol:
        raise StateError(
            f"{what}: {given:.2e} of W - s·B0·A0 lies along them (rounding leaves <= {tol:.1e}). Give the initial "
            "adapter of this very run (not another model's or checkpoint's) and the ORIGINAL base it was made from "
            "(not PiSSA's residual model)"
        )
    if exact:
        rank = a.shape[0]
        sigma = product_singular_values(a, b, scaling)  # s B0 A0's
        left = _top_singular_value(w, a, b, scaling)
        # Eckart-Young: the top r are removed iff the residual keeps no singular value above the kept ones. Rounding
        # moves P = s·B0·A0 by ||dP||_2 <= 2 u sqrt(r) sigma_1, so (Weyl) sigma_1(R) <= sigma_r(P) + 2 ||dP||_2.
        if left > sigma[-1] + tol * math.sqrt(rank) * sigma[0]:
            raise StateError(
                f"{what}: W - s·B0·A0 keeps a singular value {left:.4g} above s·B0·A0's smallest, "
                f"{float(sigma[-1]):.4g}; an exact init ('pissa') removes W's top {rank} (zero factors, LoRA's init, "
                "remove none). Is it a 'pissa_niter_K' init, or another weight's?"
            )
    # A sketch of W spans part of W's range, so a randomized init never projects W onto nothing; how much energy
    # it keeps is left to chance (with PEFT's q = r and niter 0, well under r components' average):
    # only zero is refused. Zero factors leak nothing (0 / 0), so the leak check does not see them.
    elif not bool((a @ a.mT).any() and (b.mT @ b).any()) and bool(w.any()):
        raise StateError(f"{what}: s·B0·A0 is zero (LoRA's init?), which no PiSSA init of a nonzero weight is")
    ta, tb = (t.to(w) for t in trained)
    cleaner = leak(w, ta, tb, scaling, exact)
    # Training moves the factors off the projection (the leak grows from the first step); it cannot
    # make them a cleaner one, short of undoing the init's rounding exactly. (A zero trained factor: no init.)
    if given > 2 * cleaner and bool(ta.any()) and bool(tb.any()):
        raise StateError(
            f"{where}: module '{name}': the trained adapter's factors are a cleaner PiSSA init of this base "
            f"({cleaner:.2e} along them) than the initial adapter's ({given:.2e}): the initial and trained adapters "
            "look swapped. Pass the adapter saved right after the init first, the trained one second"
        )


def _top_singular_value(w: Tensor, a: Tensor, b: Tensor, scaling: float, steps: int = 16) -> float:
    """A lower bound on sigma_1(W - s·B·A) (power iteration, from a fixed start: ||R v|| <= sigma_1 for unit v)."""
    generator = torch.Generator(device=w.device).manual_seed(0)
    v = torch.randn(w.shape[1], generator=generator, dtype=w.dtype, device=w.device)

    def residual(x: Tensor) -> Tensor:
        return w @ x - scaling * (b @ (a @ x))

    for _ in range(steps):
        u = residual(v / v.norm().clamp_min(1e-300))
        v = w.mT @ u - scaling * (a.mT @ (b.mT @ u))
    return float(residual(v / v.norm().clamp_min(1e-300)).norm())
