"""Low-rank factors of weight matrices: tensors in, tensors out.

Nothing here knows about modules, names or files. Every function accepts a single matrix
(m, n) or a batch (..., m, n) and returns factors in the dtype it was given, so callers choose
the compute dtype once (float32, or float64 for float64 weights) and batch as they like.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

#: Extra sketch columns per adapter rank unit used when ``oversample`` is not given. Real
#: pretrained weights have flat spectral tops, so the classic "+8" leaves a large error
#: (0.34 median relative error at niter 4 on all-MiniLM-L6-v2, r = 16); 4r extra columns
#: reach ~0.01 at niter 4 (see README "Randomized initialisation").
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
    valid); the global RNG is untouched. Drawn where the weight lives: the CPU takes ~2 ms for a
    4096 x 80 sketch, 0.5 s for the 224 of a 7B model, which was the whole GPU init budget.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, columns, generator=generator, dtype=dtype, device=device)


def exact_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD: (..., m, n) -> U (..., m, k), S (..., k) descending, V (..., n, k); k = min(m, n)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh.mT


def small_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of small symmetric matrices (..., k, k), eigenvalues descending.

    On a GPU this runs on the host: cuSOLVER solves one small matrix per launch (about 1 ms for
    k = 80 on an H100), LAPACK does the same in a fraction of that.
    """
    values, vectors = torch.linalg.eigh(gram.cpu())
    return values.flip(-1).to(gram.device), vectors.flip(-1).to(gram.device)


def _cholqr(y: Tensor, passes: int = 2) -> tuple[Tensor, Tensor]:
    """Cholesky-QR in float64: (Q (..., m, k), failed (...) bool), without a host sync.

    k x k Grams, Cholesky factors and GEMMs instead of a Householder QR, 5x faster for tall
    batches on a GPU. One pass leaves an orthogonality error ~ eps * cond(y)^2, enough to steer a
    power iteration; the second restores full orthogonality. ``failed`` marks items whose Gram was
    not numerically positive definite (rank-deficient y): their Q is garbage.
    """
    q = y.to(torch.float64)
    failed = torch.zeros((), dtype=torch.bool, device=y.device)
    eye = _eye(y.shape[-1], y.device)
    for _ in range(passes):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        failed = failed | (info != 0)
        q = q @ torch.linalg.solve_triangular(chol, eye, upper=False).mT
    return q.to(y.dtype), failed


@functools.lru_cache(maxsize=16)
def _eye(k: int, device: torch.device) -> Tensor:
    return torch.eye(k, dtype=torch.float64, device=device)


def orthonormalize(y: Tensor) -> Tensor:
    """An orthonormal basis (..., m, k) of the columns of ``y`` (..., m, k), k <= m, in y's dtype.

    Cholesky-QR twice; items where it fails (rank-deficient y) fall back to Householder QR.
    """
    q, failed = _cholqr(y)
    if bool(failed.any()):  # one sync per call; rare: exactly low-rank weights
        q = torch.where(failed[..., None, None], torch.linalg.qr(y.to(torch.float64)).Q.to(y.dtype), q)
    return q


def _householder(y: Tensor, passes: int = 1) -> tuple[Tensor, Tensor]:
    """Householder QR, the fallback for rank-deficient sketches: (Q, failed = False)."""
    return torch.linalg.qr(y.to(torch.float64)).Q.to(y.dtype), torch.zeros((), dtype=torch.bool, device=y.device)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core products for float32 CUDA matmuls inside the block (restored after)."""
    previous = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _normalize_columns(wv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """U, S from W V (..., m, r) for orthonormal V: S_i = ||W v_i||, U = W V / S.

    Components with S <= eps * m * max(S) (rank-deficient W) get S = 0 and U = 0, so their
    factors are zero, as with an SVD.
    """
    s = torch.linalg.vector_norm(wv, dim=-2)
    alive = s > eps * wv.shape[-2] * s.amax(dim=-1, keepdim=True)
    u = torch.where(alive.unsqueeze(-2), wv / torch.where(alive, s, 1.0).unsqueeze(-2), 0.0)
    return u, torch.where(alive, s, 0.0)


#: Extra eigenvectors kept from the compute-dtype eigensolver and refined in float64 (exact mode).
REFINE_EXTRA = 16


def gram_principal(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``rank`` singular triplets from the eigendecomposition of the smaller Gram matrix.

    The Gram G (N x N, N = min(m, n)) is formed in float64. Its eigendecomposition runs in
    ``matrix``'s dtype (fp32's eigensolver is the fast one on both CPU and GPU); the top
    ``rank + REFINE_EXTRA`` eigenvectors are then refined in float64 by one subspace-iteration
    step and a Rayleigh-Ritz projection, which removes the fp32 mixing between nearby
    eigenvectors (the only large error: it scales like eps / (sigma_r^2 - sigma_{r+1}^2)).
    The triplets come from W itself (S_i = ||W v_i||), so s * B A is W's projection onto V.

    Args:
        matrix: (..., m, n) float32 or float64.
    Returns:
        U (..., m, rank), S (..., rank) descending, V (..., n, rank), in ``matrix``'s dtype.
    """
    flip = matrix.shape[-2] < matrix.shape[-1]
    w = (matrix.mT if flip else matrix).to(torch.float64)  # (M, N), N <= M
    gram = w.mT @ w
    k = min(gram.shape[-1], rank + REFINE_EXTRA)
    basis = torch.linalg.eigh(gram.to(matrix.dtype)).eigenvectors[..., -k:].to(torch.float64)
    basis = orthonormalize(gram @ basis)
    _, rotation = small_eigh(basis.mT @ gram @ basis)
    v = basis @ rotation[..., :rank]
    u, s = _normalize_columns(w @ v, torch.finfo(matrix.dtype).eps)
    if flip:
        u, v = v, u
    return u.to(matrix.dtype), s.to(matrix.dtype), v.to(matrix.dtype)


def randomized_svd(matrix: Tensor, rank: int, niter: int, omega: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` triplets by a randomized range finder (Halko et al. 2011, Alg. 4.4 + 5.1).

    Args:
        matrix: (..., m, n).
        omega: Gaussian test matrix (..., n, rank + oversample), see :func:`sketch`.
        niter: power iterations; each costs two passes over ``matrix``.
    Returns:
        U (..., m, rank), S (..., rank), V (..., n, rank).
    """
    q, projected, failed = randomized_begin(matrix, rank, niter, omega)
    if bool(failed.any()):  # a Cholesky-QR failed (rank-deficient sketch products): Householder QR
        q, projected, failed = randomized_begin(matrix, rank, niter, omega, householder=True)
    _, rotation = small_eigh(projected @ projected.mT)
    return randomized_end(q, projected, rotation, rank, matrix.dtype)


def randomized_begin(
    matrix: Tensor, rank: int, niter: int, omega: Tensor, householder: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The device part of :func:`randomized_svd`, queued without a host sync.

    Returns Q (..., m, k) orthonormal, Q^T W (..., k, n) in float64, and ``failed`` (...): items
    whose Cholesky-QR broke down (redo them with ``householder=True``). On CUDA the power iteration
    runs on TF32 tensor cores: its products only steer the subspace (each is re-orthonormalised, and
    one step's rounding is damped by the next), while Q^T W, which the factors come from, stays in
    full float32.
    """
    if omega.shape[-1] < rank:
        raise ValueError(f"sketch has {omega.shape[-1]} columns, fewer than rank {rank}")
    orthonormal = _householder if householder else _cholqr
    failed = torch.zeros(matrix.shape[:-2], dtype=torch.bool, device=matrix.device)
    with _tf32(matrix.is_cuda):
        y = matrix @ omega
        for _ in range(niter):
            # Re-orthonormalise after every product: without it the columns collapse onto the
            # top singular vector and the small-sigma directions are lost to rounding.
            q, failed_q = orthonormal(y, passes=1)
            z, failed_z = orthonormal(matrix.mT @ q, passes=1)
            y = matrix @ z
            failed = failed | failed_q | failed_z
    q, failed_q = orthonormal(y, passes=2)
    return q, (q.mT @ matrix).to(torch.float64), failed | failed_q


def randomized_end(
    q: Tensor, projected: Tensor, rotation: Tensor, rank: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on span(Q): U, S, V from the eigenvectors ``rotation`` (..., k, k), descending,
    of the small Gram (Q^T W)(Q^T W)^T (see :func:`small_eigh`)."""
    rotation = rotation[..., :rank].to(torch.float64)
    u = q.to(torch.float64) @ rotation  # (..., m, rank), orthonormal
    # W^T u = (Q^T W)^T rotation: V S without another pass over W.
    v, s = _normalize_columns(projected.mT @ rotation, torch.finfo(dtype).eps)
    return u.to(dtype), s.to(dtype), v.to(dtype)


def split_factors(u: Tensor, s: Tensor, v: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """PiSSA factors from r singular triplets so that ``scaling * B @ A == U diag(S) V^T``.

    S is divided by the scaling *before* the square root (the reference's step 3), so alpha only
    changes the magnitude of A and B, never the product.

    Args:
        u: (..., m, r), s: (..., r), v: (..., n, r).
    Returns:
        A (..., r, n) and B (..., m, r).
    """
    root = (s / scaling).sqrt()
    a = root.unsqueeze(-1) * v.mT
    b = u * root.unsqueeze(-2)
    return a.contiguous(), b.contiguous()


def principal_factors(
    matrix: Tensor,
    rank: int,
    scaling: float,
    *,
    niter: int | None = None,
    omega: Tensor | None = None,
    components: str = "principal",
) -> tuple[Tensor, Tensor, Tensor]:
    """A (..., r, n), B (..., m, r) and the kept singular values S (..., r) of ``matrix`` (..., m, n).

    ``niter=None`` is exact (:func:`gram_principal`; a full SVD for "minor"); an int runs the
    randomized range finder with that many power iterations on ``omega`` (required then).
    ``components="minor"`` keeps the bottom r triplets (MiLoRA), exact mode only. Runs in ``matrix``'s dtype.
    """
    if components not in ("principal", "minor"):
        raise ValueError(f"components must be 'principal' or 'minor', got {components!r}")
    if niter is None and components == "principal":
        u, s, v = gram_principal(matrix, rank)
    elif niter is None:
        u, s, v = exact_svd(matrix)
        u, s, v = u[..., -rank:], s[..., -rank:], v[..., -rank:]
    else:
        if components == "minor":
            raise ValueError("components='minor' needs the exact SVD (niter=None)")
        if omega is None:
            raise ValueError("randomized decomposition needs a sketch `omega`")
        u, s, v = randomized_svd(matrix, rank, niter, omega)
    a, b = split_factors(u, s, v, scaling)
    return a, b, s


def sketch_columns(rank: int, oversample: int | None, m: int, n: int) -> int:
    """Width of the randomized sketch, capped at min(m, n) where the range is exhausted."""
    extra = OVERSAMPLE_PER_RANK * rank if oversample is None else oversample
    if extra < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    return min(rank + extra, m, n)
