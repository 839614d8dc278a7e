"""apply(..., quantize="nf4", double_quant=True): the residual stored with its absmax in 8 bits, the iterations
choosing the adapter against that quantizer, the errors recorded those of what is stored, the layer's forward and
backward, and the refusals (double_quant without quantize, a non-bool)."""

from __future__ import annotations

import math

import pytest
import seams
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import MLP, Conv1D
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa.core import nf4, nf4_stats, qpissa


def dq_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """deq(nf4_dq(w)) in float64, spelled out from the single-quantization functions and the absmax codec."""
    codes, absmax = nf4.quantize(w)
    decoded = nf4_stats.decode(*nf4_stats.encode(absmax))
    return nf4.dequantize(codes, decoded, tuple(w.shape), torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"double_quant": True}, "double_quant=True stores the 4-bit residual's absmax in 8 bits: pass quantize='nf4'"),
        ({"double_quant": True, "init": "lora"}, "pass quantize='nf4' too"),
        ({"double_quant": 1, "quantize": "nf4"}, "double_quant must be true or false, got 1"),
        ({"double_quant": "yes", "quantize": "nf4"}, "double_quant must be true or false"),
    ],
)
def test_double_quant_without_quantize_or_not_a_bool_is_refused(kwargs, match):
    model = MLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        minipissa.apply(model, 2, "all-linear", **kwargs)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=match):
        minipissa.InitConfig(2, **kwargs)


@given(
    shape=st.tuples(st.integers(2, 300), st.integers(2, 140)),
    rank=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    conv1d=st.booleans(),
    init=st.sampled_from(["pissa", "lora", "loftq"]),
    iters=st.integers(1, 2),
)
def test_apply_stores_the_double_quantized_residual_and_records_its_error(shape, rank, dtype, conv1d, init, iters):
    """The codes are nf4(W_res)'s, the statistics the 8-bit form of its absmax; nf4_error and qlora_error are the
    errors of what is stored (QLoRA's with the same quantizer); the layer dequantizes to codes x decoded absmax."""
    out_f, in_f = shape
    rank, iters = min(rank, out_f, in_f), 1 if init == "lora" else iters
    torch.manual_seed(out_f * 1000 + in_f)
    model = nn.Sequential(Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)).to(dtype)
    w = model[0].weight.detach().clone()
    minipissa.apply(model, rank, "0", init=init, quantize="nf4", quant_iters=iters, double_quant=True)
    layer = model[0]
    assert layer.info["double_quant"] is True and layer.weight.double_quant and layer.weight.dtype == dtype
    delta = layer.scaling * (layer.B0 @ layer.A0)
    residual = w.float() - (delta.mT if conv1d else delta)  # W - s B0 A0 in float32, the stored layout
    codes, absmax = nf4.quantize(residual)
    assert torch.equal(layer.weight.codes, codes)
    assert all(torch.equal(a, b) for a, b in zip(layer.weight.statistics(), nf4_stats.encode(absmax), strict=True))
    norm = w.double().norm()
    nf4_error = (residual.double() - dq_roundtrip(residual)).norm() / norm
    qlora_error = (w.double() - dq_roundtrip(w)).norm() / norm
    assert math.isclose(layer.info["nf4_error"], nf4_error.item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(layer.info["qlora_error"], qlora_error.item(), rel_tol=1e-5, abs_tol=1e-7)
    assert torch.equal(layer.residual(torch.float64), dq_roundtrip(residual))


@pytest.mark.parametrize("init", ["pissa", "loftq"])
@pytest.mark.parametrize("stack", [False, True])
def test_the_iterations_choose_against_the_double_quantized_quantizer(init, stack):
    """Every quantization target of the iterations, on both roads (one weight at a time; stacked, as on a GPU), is
    taken with the 8-bit absmax."""
    calls = []
    real = seams.real("quantization target")

    def recording(*args, **kwargs):
        calls.append(kwargs.get("double_quant", args[4] if len(args) > 4 else False))
        return real(*args, **kwargs)

    model = MLP((64, 96, 40))
    with seams.replaced("quantization target", recording):
        cfg = minipissa.InitConfig(4, init=init, quantize="nf4", quant_iters=3, double_quant=True, stack=stack)
        minipissa.apply(model, config=cfg, targets="all-linear")
    assert len(calls) == 2 * 3 - 2 * (init == "pissa") and all(c is True for c in calls)


@given(
    c=st.integers(1, 2),
    rows=st.integers(1, 600),
    cols=st.sampled_from([64, 96, 128, 130, 192]),
    conv1d=st.booleans(),
    principal=st.booleans(),
)
def test_the_double_quantized_target_in_slices_is_the_whole_formula(c, rows, cols, conv1d, principal):
    """W - deq(nf4_dq(W - s B A)), a slice of rows at a time (slices on group boundaries, 16384 weights), equals the
    formula on each whole weight bit for bit (dyadic factors: s B A exact in float32 in any order)."""
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    m, n = (cols, rows) if conv1d else (rows, cols)  # the stored layout is rows x cols
    w = torch.randn(c, m, n, generator=g)
    factors = None
    if principal:
        factors = (torch.randint(-8, 9, (c, 2, n), generator=g).float() / 16,
                   torch.randint(-8, 9, (c, m, 2), generator=g).float() / 16)  # fmt: skip
    want = []
    for k in range(c):
        p = torch.zeros(m, n) if factors is None else 0.5 * (factors[1][k] @ factors[0][k])
        stored = (w[k] - p).mT.contiguous() if conv1d else w[k] - p
        back = dq_roundtrip(stored).float()
        want.append(w[k] - (back.mT if conv1d else back))
    with seams.replaced("quantizer slice", 64):  # the fewest rows per slice that start on a group
        got = qpissa.quantization_target(w, factors, 0.5, conv1d, double_quant=True)
    assert torch.equal(got, torch.stack(want))


def test_forward_backward_keep_only_the_8bit_statistics_and_compile():
    """The fused function saves the absmax codes, scales and offsets for backward, never the decoded float32 absmax;
    its outputs and gradients are the reference path's (bias trained) within a few roundings, and it traces."""
    torch.manual_seed(0)
    model = minipissa.apply(MLP((128, 160, 64)), 4, "all-linear", alpha=8, quantize="nf4", double_quant=True)
    layers = [layer for _, layer in minipissa.pissa_layers(model)]
    x = torch.randn(6, 128)

    def grads():
        y = model(x)
        return torch.autograd.grad(y.square().mean(), [t for layer in layers for t in (layer.A, layer.B)]), y

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused, y = grads()
    blocks = {layer.weight.absmax_codes.numel() for layer in layers}
    assert not [t for t in saved if t.is_floating_point() and t.dim() == 1 and t.numel() in blocks]
    assert sum(t.dtype == torch.uint8 for t in saved) == 2 * len(layers)  # the 4-bit codes and the absmax codes
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = y.detach()
    assert torch.allclose(compiled(x), y, rtol=1e-5, atol=1e-6 * y.abs().max().item())
    for layer in layers:
        layer.bias.requires_grad_(True)  # the reference path: x deq(W_res)^T + b + s (x A^T) B^T as plain ops
    reference, y_ref = grads()
    tol = 8 * torch.finfo(torch.float32).eps
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for u, v in zip(fused, reference, strict=True):
        assert torch.allclose(u, v, rtol=tol, atol=tol * v.abs().max().item())


def test_summary_shows_the_quantizer_and_the_bytes():
    model = minipissa.apply(MLP((64, 256, 32)), 4, "layers.0", quantize="nf4", double_quant=True)
    minipissa.apply(model, 4, "layers.1", quantize="nf4")
    text = str(minipissa.summary(model))
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "nf4+dq" in rows["layers.0"] and " 4.13 " in rows["layers.0"]
    assert " nf4 " in rows["layers.1"] and " 4.50 " in rows["layers.1"]
    stored = nf4.stored_bytes(256 * 64, True) + nf4.stored_bytes(32 * 256)
    assert f"4-bit residuals (nf4/nf4+dq): 2 modules, {stored:,} bytes" in text
