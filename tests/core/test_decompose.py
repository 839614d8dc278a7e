"""Properties of the factorisation itself: tensors in, tensors out."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from minipissa.core import decompose


def with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(sigma) V^T in float64 with random orthonormal U (m, k), V (n, k); k = len(sigma)."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (u * sigma.double()) @ v.T


def best_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))
dtypes = st.sampled_from([torch.float32, torch.float64])


@given(shape=shapes, data=st.data(), alpha=st.floats(0.25, 64.0), rslora=st.booleans(), dtype=dtypes)
def test_split_factors_reproduce_the_triplets(shape, data, alpha, rslora, dtype):
    m, n = shape
    r = data.draw(st.integers(1, min(m, n)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n), dtype=torch.float64)
    u, s, v = decompose.exact_svd(w)
    u, s, v = u[:, :r].to(dtype), s[:r].to(dtype), v[:, :r].to(dtype)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    a, b = decompose.split_factors(u, s, v, scaling)
    assert a.shape == (r, n) and b.shape == (m, r)
    # Each entry of B @ A is an r-term dot product: error <= ~(r + 4) eps |U||S||V^T| (sqrt, divide and
    # the scaling add a few roundings); |U||S||V^T| has Frobenius norm <= sqrt(r) ||S||_2.
    eps = torch.finfo(dtype).eps
    err = (scaling * (b @ a) - (u * s) @ v.T).norm()
    assert err <= 4 * (r + 4) * eps * math.sqrt(r) * s.norm()


@given(shape=shapes, data=st.data(), scaling=st.floats(0.1, 10.0), dtype=dtypes)
@example(shape=(1, 1), data=None, scaling=1.0, dtype=torch.float32).via("r = min(m, n): residual is zero")
def test_exact_factors_are_an_optimal_rank_r_approximation(shape, data, scaling, dtype):
    m, n = shape
    r = min(m, n) if data is None else data.draw(st.integers(1, min(m, n)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(7 * m + n), dtype=dtype)
    a, b, s = decompose.principal_factors(w, r, scaling)
    # Gap-insensitive: a wrong subspace raises ||W - P||; a rounding-level one cannot beyond
    # a backward-error term of ~eps * sqrt(min(m, n)) * ||W||_F (stable SVD plus one product).
    optimum = (w.double() - best_rank_r(w, r)).norm()
    achieved = (w.double() - scaling * (b.double() @ a.double())).norm()
    eps = torch.finfo(dtype).eps
    assert achieved <= optimum + 20 * eps * math.sqrt(min(m, n)) * w.double().norm()
    # s A A^T = diag(S) holds whatever the gaps are: V is orthonormal to rounding.
    gram = scaling * (a.double() @ a.double().T)
    assert torch.allclose(gram, torch.diag(s.double()), atol=20 * eps * max(m, n) * s.double().max().item())


@given(m=st.integers(8, 40), n=st.integers(8, 40), data=st.data(), dtype=dtypes)
def test_gapped_spectrum_gives_the_principal_part(m, n, data, dtype):
    k = min(m, n)
    r = data.draw(st.integers(1, k - 1))
    top = torch.linspace(2.0, 1.0, r, dtype=torch.float64)
    rest = torch.linspace(0.5, 0.01, k - r, dtype=torch.float64)
    w64 = with_spectrum(m, n, torch.cat([top, rest]), seed=m * n)
    w = w64.to(dtype)
    a, b, s = decompose.principal_factors(w, r, 1.0)
    p_r = best_rank_r(w, r)
    # Wedin: the rank-r part moves by ~ eps ||W|| / gap (gap = sigma_r - sigma_{r+1} = 0.5 here),
    # times a modest polynomial in the size for the backward error of the SVD.
    gap = 0.5
    eps = torch.finfo(dtype).eps
    assert (b.double() @ a.double() - p_r).norm() <= 20 * math.sqrt(k) * eps * w64.norm() / gap * p_r.norm()
    assert torch.allclose(s.double(), top, rtol=0, atol=20 * eps * math.sqrt(k) * 2.0)
    # A's rows and B's columns are orthogonal.
    for g in (a.double() @ a.double().T, b.double().T @ b.double()):
        off = g - torch.diag(torch.diagonal(g))
        assert off.abs().max() <= 20 * math.sqrt(k) * eps * 2.0 / gap


def test_minor_components_are_the_bottom_triplets():
    sigma = torch.cat([torch.linspace(3.0, 1.0, 17), torch.tensor([0.2, 0.1, 0.05])]).double()
    w = with_spectrum(30, 20, sigma, seed=3)  # full rank: all 20 singular values are nonzero
    a, b, s = decompose.principal_factors(w, 3, 2.0, minor=True)
    assert torch.allclose(s, sigma[-3:], atol=1e-12)
    u, sv, vh = torch.linalg.svd(w)
    bottom = (u[:, 17:20] * sv[17:20]) @ vh[17:20]
    assert torch.allclose(2.0 * b @ a, bottom, atol=1e-12)


def relative_error(w: torch.Tensor, r: int, niter: int, columns: int, seed: int) -> float:
    omega = decompose.sketch(w.shape[1], columns, seed, w.dtype, w.device)
    a, b, _ = decompose.principal_factors(w, r, 1.0, niter=niter, omega=omega)
    p_r = best_rank_r(w, r)
    return ((b.double() @ a.double() - p_r).norm() / p_r.norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_error_falls_with_power_iterations(seed):
    # sigma_i = 1/i: a slowly decaying, gap-poor spectrum like real weights' tops.
    sigma = 1.0 / torch.arange(1, 121, dtype=torch.float64)
    w = with_spectrum(200, 160, sigma, seed=seed).float()
    r = 8
    columns = decompose.sketch_columns(r, None, *w.shape)
    e0 = relative_error(w, r, 0, columns, seed)
    e8 = relative_error(w, r, 8, columns, seed)
    assert e8 < e0 / 10
    # Halko et al.: error ~ (sigma_{l+1} / sigma_r)^(2q+1) = (8/41)^17, far below fp32 rounding
    # amplified by the gap (1/8 - 1/9 = 0.014): eps / gap ~ 1e-5.
    assert e8 < 1e-4


def test_sketch_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first = decompose.sketch(50, 12, 123, torch.float32, torch.device("cpu"))
    second = decompose.sketch(50, 12, 123, torch.float32, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(first, second)
    assert not torch.equal(first, decompose.sketch(50, 12, 124, torch.float32, torch.device("cpu")))


def test_module_seed_depends_on_seed_and_name():
    seeds = {decompose.module_seed(s, n) for s in (0, 1) for n in ("a.q_proj", "a.v_proj")}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_randomized_factors_reject_bad_arguments():
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="sketch"):
        decompose.principal_factors(w, 2, 1.0, niter=2)
    with pytest.raises(ValueError, match=">= rank = 5 columns"):
        decompose.top_triplets(w, 5, niter=1, omega=torch.randn(8, 4))
    assert decompose.sketch_columns(4, None, 100, 100) == 4 + 4 * decompose.OVERSAMPLE_PER_RANK
    assert decompose.sketch_columns(4, 3, 6, 100) == 6
