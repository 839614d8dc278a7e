"""Low-rank factors of weight matrices: tensors in, tensors out.

Nothing here knows about modules, names or files. Every function accepts a single matrix
(m, n) or a batch (..., m, n) and returns factors in the dtype it was given, so callers choose
the compute dtype once (float32, or float64 for float64 weights) and batch as they like.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import linalg

#: Extra sketch columns per adapter rank unit used when ``oversample`` is not given. Real
#: pretrained weights have flat spectral tops, so the classic "+8" leaves a large error at
#: a few power iterations; extra columns in proportion to r remove most of it (see README
#: "Randomized initialisation").
OVERSAMPLE_PER_RANK = 4


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the decomposition runs in: float64 for float64 weights, else float32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, module name), stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch(n: int, columns: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A Gaussian test matrix (n, columns) drawn on ``device`` from its own generator.

    The same seed gives the same sketch on the same kind of device (the CPU's and CUDA's generators
    differ, so factors from a CPU and a GPU init differ by the randomness of the sketch, both
    valid); the global RNG is untouched. Drawn where the weight lives: drawing a GPU init's sketches on the
    CPU took as long as the rest of the init.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, columns, generator=generator, dtype=dtype, device=device)


@linalg.on_one_thread
def exact_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD: (..., m, n) -> U (..., m, k), S (..., k) descending, V (..., n, k); k = min(m, n)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh.mT


#: An orthonormal basis of the columns of y (..., m, k) and the Cholesky ``info`` tensors (see linalg.failures).
Orthonormal = Callable[[Tensor], tuple[Tensor, list[Tensor]]]

#: Extra eigenvectors kept from the compute-dtype eigensolver and refined in float64 (exact mode).
REFINE_EXTRA = 16


@dataclass
class Started:
    """A top-r decomposition whose device work is queued, with no host sync yet.

    What is left is a small symmetric eigenproblem, ``gram`` (..., k, k) in float64, for the host
    (:func:`linalg.small_eigh`); ``finish(vectors)`` turns its eigenvectors (..., k, k), eigenvalues
    descending, into U (..., m, r), S (..., r), V (..., n, r). ``failed`` (...) marks items whose
    Cholesky-QR broke down (rank-deficient products): see :func:`triplets`. Split this way, a GPU can
    run the next matrices while the host solves this one's eigenproblem.
    """

    gram: Tensor
    failed: Tensor
    finish: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


@linalg.on_one_thread
def start(
    matrix: Tensor, rank: int, *, niter: int | None = None, omega: Tensor | None = None, householder: bool = False
) -> Started:
    """Queue the top-``rank`` decomposition of ``matrix`` (..., m, n).

    ``niter=None``, exact: the Gram G (N x N, N = min(m, n)) is formed in float64; its eigendecomposition
    runs in ``matrix``'s dtype (fp32's eigensolver is the fast one on both CPU and GPU); the top
    ``rank + REFINE_EXTRA`` eigenvectors are then refined in float64 by one subspace-iteration step and a
    Rayleigh-Ritz projection, which removes the fp32 mixing between nearby eigenvectors (the only large
    error: it scales like eps / (sigma_r^2 - sigma_{r+1}^2)). The triplets come from W itself
    (S_i = ||W v_i||), so s * B A is W's projection onto V.

    An int ``niter``, randomized: a range finder (Halko et al. 2011, Alg. 4.4 + 5.1) with that many power
    iterations (two passes over ``matrix`` each) on the Gaussian sketch ``omega`` (..., n, columns),
    columns >= rank (see :func:`sketch`). On CUDA the power iteration runs on TF32 tensor cores: its
    products only steer the subspace (each is re-orthonormalised, and one step's rounding is damped by the
    next), while Q^T W, which the factors come from, stays in full float32.

    ``householder``: orthonormalise with Householder QR instead of Cholesky-QR (never fails; slower).
    """
    # The power iteration's steps only steer the subspace: one Cholesky-QR pass in the working dtype will do.
    orthonormal: Orthonormal = linalg.householder if householder else linalg.cholqr
    steer: Orthonormal = linalg.householder if householder else functools.partial(linalg.cholqr, passes=1, wide=False)
    if niter is None:
        return _start_gram(matrix, rank, orthonormal)
    if omega is None or omega.shape[-1] < rank:
        raise ValueError(f"a randomized decomposition needs a sketch of >= rank = {rank} columns")
    return _start_randomized(matrix, rank, niter, omega, orthonormal, steer)


def triplets(
    started: Started, vectors: Callable[[], Tensor], again: Callable[[], Started]
) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, V of a started decomposition from its host eigenvectors (``vectors()``); if any item's
    Cholesky-QR broke down (exactly low-rank weights; rare), the whole start is redone by ``again()``, a
    :func:`start` with ``householder=True``. One host sync."""
    if bool(started.failed.any()):
        started = again()
        return started.finish(linalg.small_eigh(started.gram)[1])
    return started.finish(vectors())


@linalg.on_one_thread
def top_triplets(
    matrix: Tensor, rank: int, *, niter: int | None = None, omega: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``matrix`` (..., m, n), exact or randomized (see :func:`start`):
    U (..., m, rank), S (..., rank) descending, V (..., n, rank), in ``matrix``'s dtype."""
    started = start(matrix, rank, niter=niter, omega=omega)
    return triplets(
        started,
        lambda: linalg.small_eigh(started.gram)[1],
        lambda: start(matrix, rank, niter=niter, omega=omega, householder=True),
    )


def _start_gram(matrix: Tensor, rank: int, orthonormal: Orthonormal) -> Started:
    flip = matrix.shape[-2] < matrix.shape[-1]
    w = (matrix.mT if flip else matrix).to(torch.float64)  # (M, N), N <= M
    gram = w.mT @ w
    k = min(gram.shape[-1], rank + REFINE_EXTRA)
    basis = torch.linalg.eigh(gram.to(matrix.dtype)).eigenvectors[..., -k:].to(torch.float64)
    basis, infos = orthonormal(gram @ basis)
    w_basis = w @ basis  # (M, k): all that finish() needs of W, so W and G can go now
    dtype, eps = matrix.dtype, torch.finfo(matrix.dtype).eps

    def finish(vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rotation = vectors[..., :rank].to(torch.float64)
        v = basis @ rotation
        u, s = linalg.normalize_columns(w_basis @ rotation, eps)
        if flip:
            u, v = v, u
        return u.to(dtype), s.to(dtype), v.to(dtype)

    failed = linalg.failures(infos, matrix.shape[:-2], matrix.device)
    return Started(basis.mT @ gram @ basis, failed, linalg.on_one_thread(finish))


def _start_randomized(
    matrix: Tensor, rank: int, niter: int, omega: Tensor, orthonormal: Orthonormal, steer: Orthonormal
) -> Started:
    infos: list[Tensor] = []
    with linalg.tf32(matrix.is_cuda):
        y = matrix @ omega
        for _ in range(niter):
            # Re-orthonormalise after every product: without it the columns collapse onto the
            # top singular vector and the small-sigma directions are lost to rounding.
            q, infos_q = steer(y)
            z, infos_z = steer(matrix.mT @ q)
            y = matrix @ z
            infos += infos_q + infos_z
    q, infos_q = orthonormal(y)
    failed = linalg.failures(infos + infos_q, matrix.shape[:-2], matrix.device)
    projected = (q.mT @ matrix).to(torch.float64)  # (..., k, n)
    dtype, eps = matrix.dtype, torch.finfo(matrix.dtype).eps

    def finish(vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Rayleigh-Ritz on span(Q) with the eigenvectors of (Q^T W)(Q^T W)^T.
        rotation = vectors[..., :rank].to(torch.float64)
        u = q.to(torch.float64) @ rotation  # (..., m, rank), orthonormal
        # W^T u = (Q^T W)^T rotation: V S without another pass over W.
        v, s = linalg.normalize_columns(projected.mT @ rotation, eps)
        return u.to(dtype), s.to(dtype), v.to(dtype)

    return Started(projected @ projected.mT, failed, linalg.on_one_thread(finish))


def split_factors(u: Tensor, s: Tensor, v: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """PiSSA factors from r singular triplets so that ``scaling * B @ A == U diag(S) V^T``.

    S is divided by the scaling *before* the square root (the reference's step 3), so alpha only
    changes the magnitude of A and B, never the product. Every path's factors come through here.

    Args:
        u: (..., m, r), s: (..., r), v: (..., n, r).
    Returns:
        A (..., r, n) and B (..., m, r).
    """
    # The sign of each singular pair is arbitrary (u, v and -u, -v are both right); fix it from the data,
    # so that every path (exact, randomized, batched, another device) gives the same factors: the entry
    # of largest magnitude of each column of U is positive (the first such entry on ties).
    sign = torch.gather(u, -2, u.abs().argmax(dim=-2, keepdim=True)).sign()
    sign = torch.where(sign == 0, 1.0, sign).to(u.dtype)
    u, v = u * sign, v * sign
    root = (s / scaling).sqrt()
    a = root.unsqueeze(-1) * v.mT
    b = u * root.unsqueeze(-2)
    return a.contiguous(), b.contiguous()


@linalg.on_one_thread
def principal_factors(
    matrix: Tensor,
    rank: int,
    scaling: float,
    *,
    niter: int | None = None,
    omega: Tensor | None = None,
    minor: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., r, n), B (..., m, r) and the kept singular values S (..., r) of ``matrix`` (..., m, n).

    The top r triplets (see :func:`start` for ``niter`` and ``omega``), or with ``minor`` the bottom r
    (MiLoRA; exact SVD). Runs in ``matrix``'s dtype.
    """
    if minor:
        u, s, v = exact_svd(matrix)
        u, s, v = u[..., -rank:], s[..., -rank:], v[..., -rank:]
    else:
        u, s, v = top_triplets(matrix, rank, niter=niter, omega=omega)
    a, b = split_factors(u, s, v, scaling)
    return a, b, s


def sketch_columns(rank: int, oversample: int | None, m: int, n: int) -> int:
    """Width of the randomized sketch (``oversample`` >= 0 extra columns, default ``OVERSAMPLE_PER_RANK``
    per rank), capped at min(m, n) where the range is exhausted."""
    extra = OVERSAMPLE_PER_RANK * rank if oversample is None else oversample
    return min(rank + extra, m, n)


def explained_energy(singular_values: list[float], weight_norm: float) -> float | None:
    """||S_r||^2 / ||W||_F^2: the share of the weight's energy in the adapter at init (None for LoRA init)."""
    if not singular_values or not weight_norm > 0:
        return None
    return sum(s * s for s in singular_values) / weight_norm**2
