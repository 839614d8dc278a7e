"""Numerical building blocks of the decompositions: orthonormal bases, small eigenproblems, TF32.

Each accepts a single matrix (..., m, k) or a batch and runs without a host sync unless it says so.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """CPU work inside the block on one thread (the calling thread's setting; restored after).

    MKL splits eigensolvers, SVDs and skinny matrix products by the thread count, and the split changes
    the rounding: an fp32 Gram's eigenvectors differ visibly between 1 and 2 threads (rows of A0 flip sign,
    nearby singular vectors mix), a sketch product slightly. On one thread a decomposition is a function of
    the matrix alone (on one CPU kind and torch build), whatever ``torch.get_num_threads()`` the user runs
    with; :mod:`minipissa.plan.factors` runs several matrices at once instead, one per thread.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def on_one_thread(fn: F) -> F:
    """``fn(matrix, ...)`` run under :func:`one_thread` for ``matrix``'s device."""

    @functools.wraps(fn)
    def wrapper(matrix: Tensor, *args: Any, **kwargs: Any) -> Any:
        with one_thread(matrix.device):
            return fn(matrix, *args, **kwargs)

    return cast(F, wrapper)


def small_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of small symmetric matrices (..., k, k), eigenvalues descending.

    On a GPU this runs on the host: cuSOLVER solves one small matrix per launch, and LAPACK on the
    host does the same in a fraction of the time.
    """
    with one_thread(torch.device("cpu")):
        values, vectors = torch.linalg.eigh(gram.cpu())
    return values.flip(-1).to(gram.device), vectors.flip(-1).to(gram.device)


def cholqr(y: Tensor, passes: int = 2, wide: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Cholesky-QR: (Q (..., m, k) in y's dtype, the Cholesky ``info`` tensors), without a host sync.

    k x k Grams, Cholesky factors and GEMMs instead of a Householder QR: much faster for tall
    batches on a GPU. One pass leaves an orthogonality error ~ eps * cond(y)^2, enough to steer a
    power iteration; the second restores full orthogonality. ``wide``: compute in float64 (else in
    y's dtype: fewer kernels, for steering steps). A nonzero info (see :func:`failures`) marks an
    item whose Gram was not numerically positive definite (rank-deficient y): its Q is garbage.
    """
    dtype = torch.float64 if wide else y.dtype
    q = y.to(dtype)
    eye = _eye(y.shape[-1], y.device, dtype)
    infos = []
    for _ in range(passes):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        infos.append(info)
        q = q @ torch.linalg.solve_triangular(chol, eye, upper=False).mT
    return q.to(y.dtype), infos


@functools.lru_cache(maxsize=16)
def _eye(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.eye(k, dtype=dtype, device=device)


def failures(infos: list[Tensor], batch: torch.Size, device: torch.device) -> Tensor:
    """(batch) bool: the items for which any of these Cholesky ``info`` tensors is nonzero."""
    if not infos:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.stack(infos).ne(0).any(dim=0)


def householder(y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Householder QR, the fallback for rank-deficient sketches: (Q, no failures)."""
    return torch.linalg.qr(y.to(torch.float64)).Q.to(y.dtype), []


@on_one_thread
def product_core(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """b @ a of factors a (r, in), b (out, r) as Q_b C Q_a^T, without forming the (out, in) product, in float64:
    b = Q_b R_b and a^T = Q_a R_a (thin QRs), so b a = Q_b (R_b R_a^T) Q_a^T with Q_b (out, r) and Q_a (in, r)
    orthonormal. The SVD of the small core C = R_b R_a^T (r, r) is b a's: the same singular values, vectors Q_b U
    and Q_a V."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().mT)
    return qb, rb @ ra.mT, qa


def product_singular_values(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The singular values (r,) of ``scaling`` * b @ a (:func:`product_core`), descending, in float64."""
    return torch.linalg.svdvals(scaling * product_core(a, b)[1])


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core products for float32 CUDA matmuls inside the block (restored after)."""
    previous = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def normalize_columns(wv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """U, S from W V (..., m, r) for orthonormal V: S_i = ||W v_i||, U = W V / S.

    Components with S <= eps * m * max(S) (rank-deficient W) get S = 0 and U = 0, so their
    factors are zero, as with an SVD.
    """
    s = torch.linalg.vector_norm(wv, dim=-2)
    alive = s > eps * wv.shape[-2] * s.amax(dim=-1, keepdim=True)
    u = torch.where(alive.unsqueeze(-2), wv / torch.where(alive, s, 1.0).unsqueeze(-2), 0.0)
    return u, torch.where(alive, s, 0.0)
