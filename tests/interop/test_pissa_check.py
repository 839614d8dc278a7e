"""pissa_check: every PiSSA init of W passes (exact or randomized, rounded to its storage dtype); factors of another
weight, zero factors, non-principal triplets, other scalings and trained factors do not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import MLP

import minipissa
from minipissa import StateError
from minipissa.interop.pissa_check import check_pissa_init, leak, tolerance


def spectrum_matrix(m: int, n: int, seed: int, decay: float = 0.5) -> torch.Tensor:
    """(m, n) float64 with random singular vectors and sigma_i = i^-decay (gaps everywhere)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return (u * torch.arange(1, k + 1, dtype=torch.float64).pow(-decay)) @ v.mT


def peft_factors(w: torch.Tensor, r: int, s: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT 0.21.2's LoraLayer.pissa_init, in float32: A0 = sqrt(S/s) U^T..., B0 = V sqrt(S/s) (its names)."""
    w = w.float()
    if niter is None:
        v, sv, uh = torch.linalg.svd(w, full_matrices=False)
        v, sv, uh = v[:, :r], sv[:r], uh[:r]
    else:
        v, sv, u = torch.svd_lowrank(w, r, niter=niter)
        uh = u.t()
    root = (sv / s).sqrt()
    return torch.diag(root) @ uh, v @ torch.diag(root)


def check(w, a0, b0, s, exact, trained=None) -> None:  # type: ignore[no-untyped-def]
    check_pissa_init("m", w, a0, b0, s, exact, trained if trained is not None else (a0, b0), "test")


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(8, 48), n=st.integers(8, 48), r=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
    s=st.sampled_from([0.25, 1.0, 2.0, 16.0]), niter=st.sampled_from([None, 0, 1, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)  # fmt: skip
def test_every_peft_pissa_init_passes_in_its_storage_dtype(m, n, r, seed, s, niter, dtype) -> None:  # type: ignore[no-untyped-def]
    """PEFT's exact and randomized (q = r) inits, stored in float32, bfloat16 or float16: the rounding stays under
    the tolerance derived from the dtype (and so the trained-swap check sees nothing either)."""
    r = min(r, m, n)
    w = spectrum_matrix(m, n, seed).float()
    torch.manual_seed(seed)  # svd_lowrank's sketch: the global RNG, as in PEFT
    a0, b0 = (t.to(dtype) for t in peft_factors(w, r, s, niter))
    check(w, a0, b0, s, niter is None)


@pytest.mark.parametrize(
    ("dtype", "u", "smaller"), [(torch.bfloat16, 2.0**-8, 4 * 2.0**-11), (torch.float32, 2.0**-11, 4 * 2.0**-24)]
)
@pytest.mark.parametrize(("m", "n", "r"), [(32, 24, 4), (48, 48, 6), (24, 40, 1)])
def test_the_worst_elementwise_rounding_stays_within_the_tolerance(dtype, u, smaller, m, n, r) -> None:  # type: ignore[no-untyped-def]
    """Each factor entry off by a relative u (bfloat16's unit roundoff; TF32's for float32, the floor), each sign
    chosen to grow the leak (its gradient): the leak stays under the tolerance (4u; measured 0.55-0.68 u) and
    above the next smaller one (so the bfloat16 tolerance and the TF32 floor are both needed)."""
    w = spectrum_matrix(m, n, r)
    a, b = (t.double().requires_grad_() for t in peft_factors(w, r, 1.0, None))
    residual = w - b @ a
    sides = (b.mT @ residual).square().sum() / b.detach().square().sum()
    grad_a, grad_b = torch.autograd.grad(sides + (residual @ a.mT).square().sum() / a.detach().square().sum(), (a, b))
    a, b = (t.detach() * (1 + u * torch.sign(t.detach() * g)) for t, g in ((a, grad_a), (b, grad_b)))
    assert smaller < leak(w, a, b, 1.0, True) < tolerance(dtype)
    check(w, a.to(dtype), b.to(dtype), 1.0, exact=True)


@pytest.mark.parametrize("niter", [None, 2])
def test_minipissas_own_inits_pass(niter) -> None:  # type: ignore[no-untyped-def]
    """minipissa's exact and randomized (oversampled, Rayleigh-Ritz) factors are projections too."""
    torch.manual_seed(0)
    model = MLP((32, 48, 24))
    weights = {f"layers.{i}": layer.weight.detach().clone() for i, layer in enumerate(model.layers)}
    for name, layer in minipissa.pissa_layers(minipissa.apply(model, 4, list(weights), niter=niter, alpha=2.0)):
        check(weights[name], layer.A0, layer.B0, layer.scaling, niter is None)


W = spectrum_matrix(40, 32, 1)
A0, B0 = peft_factors(W, 4, 2.0, None)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("another weight's", "lies along them"),
        ("another scaling", "lies along them"),
        ("randomized, called exact", "lies along them"),
        ("zero", "keeps a singular value .* above s·B0·A0's smallest, 0;"),
        ("B0 zero (LoRA's init)", "lies along them"),
        ("minor components", "keeps a singular value"),
        ("triplets 2..r+1", "keeps a singular value"),
        ("NaN weight", "holds NaN or infinite"),
    ],
)
def test_factors_that_are_not_this_weights_init_are_refused(case, match) -> None:  # type: ignore[no-untyped-def]
    w, a0, b0, s = W.float(), A0, B0, 2.0
    if case == "another weight's":
        a0, b0 = peft_factors(spectrum_matrix(40, 32, 2), 4, s, None)
    elif case == "another scaling":
        a0, b0 = peft_factors(W, 4, 1.0, None)
    elif case == "randomized, called exact":
        torch.manual_seed(0)
        a0, b0 = peft_factors(W, 4, s, 1)
    elif case == "zero":
        a0, b0 = torch.zeros_like(a0), torch.zeros_like(b0)
    elif case == "B0 zero (LoRA's init)":
        b0 = torch.zeros_like(b0)
    elif case in ("minor components", "triplets 2..r+1"):
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        keep = slice(-4, None) if case == "minor components" else slice(1, 5)
        root = (sv[keep] / s).sqrt()
        a0, b0 = root[:, None] * vh[keep], u[:, keep] * root
    else:
        w = w.clone()
        w[3, 5] = float("nan")
    with pytest.raises(StateError, match=match):
        check(w, a0, b0, s, exact=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_exact_init_at_a_repeated_singular_value_passes(dtype) -> None:  # type: ignore[no-untyped-def]
    """sigma_r = sigma_{r+1}: the residual's top singular value equals the smallest kept one, and rounding puts it
    above as often as below; the allowance (Weyl: 2 ||dP||) keeps every such genuine init."""
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        u = torch.linalg.qr(torch.randn(24, 12, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(20, 12, generator=g, dtype=torch.float64))[0]
        sigma = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0] + [0.5 / (i + 1) for i in range(7)], dtype=torch.float64)
        w = ((u * sigma) @ v.mT).float()
        a0, b0 = (t.to(dtype) for t in peft_factors(w, 3, 1.0, None))
        check(w, a0, b0, 1.0, exact=True)


@pytest.mark.parametrize("zero", ["A0", "B0", "both"])
def test_zero_factors_are_refused_as_randomized_inits_too(zero) -> None:  # type: ignore[no-untyped-def]
    a0 = torch.zeros_like(A0) if zero in ("A0", "both") else A0
    b0 = torch.zeros_like(B0) if zero in ("B0", "both") else B0
    with pytest.raises(StateError, match="is zero .LoRA's init"):
        check(W.float(), a0, b0, 2.0, exact=False)
    check(torch.zeros(40, 32), torch.zeros_like(A0), torch.zeros_like(B0), 2.0, exact=False)  # W = 0: zero is right
    check(torch.zeros(40, 32), torch.zeros_like(A0), torch.zeros_like(B0), 2.0, exact=True)


def test_shifted_triplets_pass_as_randomized_the_documented_limit() -> None:
    """A randomized init (q = r, niter 0) may miss top directions: non-principal singular triplets of W pass as
    'pissa_niter_K' (a nonzero projection); only an exact init is held to Eckart-Young."""
    u, sv, vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = (sv[1:5] / 2.0).sqrt()
    check(W.float(), root[:, None] * vh[1:5], u[:, 1:5] * root, 2.0, exact=False)


def test_swapped_initial_and_trained_factors_are_refused() -> None:
    """The trained factors given as the initial: refused even when training moved them by far less than the
    tolerance (here 1e-5 relative, a few steps at lr 2e-5), since the other adapter is then a cleaner init."""
    g = torch.Generator().manual_seed(0)
    moved = (A0 + 1e-5 * A0.norm() / A0.numel() ** 0.5 * torch.randn(A0.shape, generator=g), B0)
    assert leak(W, *(t.double() for t in moved), 2.0, True) < tolerance(torch.float32)  # not caught on its own
    check(W.float(), A0, B0, 2.0, True, trained=moved)  # the right order passes
    with pytest.raises(StateError, match="look swapped"):
        check(W.float(), *moved, 2.0, True, trained=(A0, B0))
    zeros = (torch.zeros_like(A0), torch.zeros_like(B0))
    check(W.float(), A0, B0, 2.0, True, trained=zeros)  # zero trained factors leak nothing (0 / 0), but are no init
