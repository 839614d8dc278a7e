"""Starting from a 4-bit model (plan/quantized_base.py): bitsandbytes Linear4bit targets are decomposed from their
dequantized weight, exactly as the same model holding those weights in nn.Linear layers; what cannot be
read exactly is refused by name with the model unchanged; save/load, unload and convert_to_lora follow.

bitsandbytes 0.50.2 quantizes on the CPU (tests/four_bit.py) and is the oracle of the dequantized weights. NF4Linear
targets: tests/plan/test_nf4linear_base.py (no bitsandbytes needed)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import MLP
from safetensors.torch import load_file
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.core import nf4
from minipissa.core.fingerprint import fingerprint
from minipissa.plan.quantized_base import dense_weight, is_four_bit

pytest.importorskip("bitsandbytes", reason="bitsandbytes quantizes the 4-bit models of these tests")
from four_bit import assert_same_layers, bits, dequantized, four_bit, linear4bit, plain_copy  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: The widest gap between adjacent NF4 codes (-1.0 .. -0.696) halved: a scaled value lies at most this far from its
#: code, so |w - deq(nf4(w))| <= HALF_GAP * its block's absmax (+ float32 roundings).
HALF_GAP = max(b - a for a, b in zip(nf4.CODE[:-1], nf4.CODE[1:], strict=True)) / 2


def models(seed: int, dtype: torch.dtype, nested: bool, sizes=(64, 40, 24)) -> tuple[nn.Module, nn.Module]:
    """A 4-bit MLP (bitsandbytes, quantized from ``dtype``) and the same MLP holding bnb's dequantized weights."""
    torch.manual_seed(seed)
    four = four_bit(MLP(sizes).to(dtype), nested)
    return four, plain_copy(four, MLP(sizes).to(dtype))


# --------------------------------------------------------------------------------------------------------------
# The reader


@given(
    shape=st.tuples(st.integers(1, 20), st.integers(1, 150)),
    dtype=st.sampled_from(DTYPES),
    nested=st.booleans(),
    storage=st.sampled_from([torch.uint8, torch.bfloat16]),
    blocksize=st.sampled_from([64, 128]),
)
@example(shape=(40, 96), dtype=torch.bfloat16, nested=True, storage=torch.bfloat16, blocksize=64)
@example(shape=(3, 5), dtype=torch.float16, nested=True, storage=torch.uint8, blocksize=64)  # odd numel
def test_dense_weight_is_bnbs(shape, dtype, nested, storage, blocksize):
    out_f, in_f = shape
    if storage != torch.uint8 and (out_f * in_f + 1) // 2 % 2:
        storage = torch.uint8  # a bfloat16 storage needs an even count of bytes (bitsandbytes views them so)
    torch.manual_seed(out_f * 1000 + in_f)
    layer = linear4bit(nn.Linear(in_f, out_f).to(dtype), nested, blocksize=blocksize, storage=storage)
    assert is_four_bit(layer) and layer.weight.dtype == storage
    got = dense_weight(layer, "layer")
    assert got is not None and got.dtype == dtype and got.shape == shape
    assert torch.equal(bits(got), bits(dequantized(layer.weight)))
    assert dense_weight(nn.Linear(in_f, out_f)) is None and not is_four_bit(nn.Linear(in_f, out_f))


def test_a_plain_linear_holding_a_params4bit_is_read_not_decomposed_as_its_bytes():
    """peft#3742: an nn.Linear whose weight is a quantized Params4bit with float storage reports a float dtype while
    it holds packed indices; PEFT's PiSSA ran its SVD on them. Here it is read as 4 bits; and a Params4bit not yet
    quantized (bitsandbytes quantizes at the first .to(device)) is decomposed as the float weight it still is."""
    torch.manual_seed(0)
    packed = linear4bit(nn.Linear(64, 16).to(torch.bfloat16), False, storage=torch.bfloat16)
    host = nn.Sequential(nn.Linear(64, 16).to(torch.bfloat16))
    host[0].weight, host[0].bias = packed.weight, packed.bias
    assert host[0].weight.dtype == torch.bfloat16 and host[0].weight.shape == (256, 1)  # 1024 indices: 512 bytes
    plain = nn.Sequential(nn.Linear(64, 16).to(torch.bfloat16))
    plain[0].weight = nn.Parameter(dequantized(packed.weight))
    plain[0].bias = nn.Parameter(packed.bias.detach().clone())
    minipissa.apply(host, 4, "0", quantize="nf4")
    minipissa.apply(plain, 4, "0", quantize="nf4")
    assert_same_layers(host, plain)

    from four_bit import bnb

    w = torch.randn(16, 64)
    layer = bnb().nn.Linear4bit(64, 16, quant_type="nf4")  # never moved: not quantized
    layer.weight = bnb().nn.Params4bit(w.clone(), quant_type="nf4", module=layer)
    assert layer.weight.bnb_quantized is False and layer.weight.quant_state is None
    assert torch.equal(dense_weight(layer), w)
    lone, ref = nn.Sequential(layer), nn.Sequential(nn.Linear(64, 16))
    ref[0].weight, ref[0].bias = nn.Parameter(w.clone()), nn.Parameter(layer.bias.detach().clone())
    minipissa.apply(lone, 4, "0")
    minipissa.apply(ref, 4, "0")
    assert_same_layers(lone, ref)


# --------------------------------------------------------------------------------------------------------------
# apply: the dequantized weights' init, bit for bit


@given(
    dtype=st.sampled_from(DTYPES),
    nested=st.booleans(),
    quantize=st.sampled_from([None, "nf4"]),
    init=st.sampled_from(["pissa", "loftq", "lora"]),
    iters=st.integers(1, 2),
    rank=st.integers(1, 8),
    niter=st.sampled_from([None, 2]),
    double_quant=st.booleans(),
)
@example(
    dtype=torch.bfloat16, nested=True, quantize="nf4", init="pissa", iters=2, rank=4, niter=None, double_quant=True
)
def test_apply_on_a_4bit_model_is_apply_on_its_dequantized_weights(
    dtype, nested, quantize, init, iters, rank, niter, double_quant
):
    """Factors, 4-bit codes (or dense residual), fingerprints and errors are those of the same model holding bnb's
    dequantized weights in nn.Linear layers: the 4-bit model is decomposed from W_deq, then re-quantized (QPiSSA),
    its new residual's absmax in 8 bits or not (minipissa's own double quantization, whatever bnb's was)."""
    iters = 1 if init == "lora" or quantize is None else iters  # iterations choose against the quantizer
    quantize = "nf4" if init == "loftq" else quantize  # LoftQ alternates with it
    double_quant = double_quant and quantize is not None  # it stores a 4-bit residual's statistics
    four, plain = models(rank, dtype, nested)
    options = dict(quantize=quantize, quant_iters=iters, init=init, alpha=2 * rank, niter=niter)
    options["double_quant"] = double_quant
    minipissa.apply(four, rank, "all-linear", **options)
    minipissa.apply(plain, rank, "all-linear", **options)
    assert_same_layers(four, plain)
    x = torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(bits(four(x)), bits(plain(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("nested", [False, True])
def test_outputs_at_init_are_the_4bit_models_within_the_residuals_requantization(dtype, quantize, nested):
    """At init the layer computes W_res_q x + s B0 A0 x + b with W_res_q = deq(nf4(W_deq - s B0 A0)), not W_deq x + b
    exactly: each element of W_res_q is within HALF_GAP * M of W_res (M = max |W_res| bounds every block's absmax),
    so |y - y4| <= HALF_GAP * M * ||x||_1, plus the dtype's roundings of the products and of W_res (a gamma_k bound,
    k = in + r + 10 roundings relative to |x| (|W_deq| + 2 s |B0| |A0| + HALF_GAP M)). Dense (quantize=None): the
    roundings alone."""
    torch.manual_seed(3)
    layer = linear4bit(nn.Linear(96, 40).to(dtype), nested)
    w_deq, bias = dequantized(layer.weight).double(), layer.bias.detach().double()
    model = minipissa.apply(nn.Sequential(layer), 8, "0", quantize=quantize)
    adapted = model[0]
    s, a0, b0 = adapted.scaling, adapted.A0.double(), adapted.B0.double()
    x = torch.randn(16, 96).to(dtype)
    with torch.no_grad():
        got = model(x).double()
    xd = x.double()
    want = xd @ w_deq.T + bias
    m = (w_deq - s * b0 @ a0).abs().max().item()
    quantization = HALF_GAP * m * xd.abs().sum(-1, keepdim=True) if quantize else 0.0
    magnitude = w_deq.abs() + 2 * s * b0.abs() @ a0.abs() + (HALF_GAP * m if quantize else 0.0)
    rounding = (96 + 8 + 10) * torch.finfo(dtype).eps * (xd.abs() @ magnitude.T + bias.abs())
    error = (got - want).abs()
    assert (error <= quantization * (1 + 1e-3) + rounding).all()
    if quantize:  # the bound is not vacuous: re-quantizing moves the output, by less than the bound
        assert error.max() > 0 and error.max() < 0.5 * quantization.max()


# --------------------------------------------------------------------------------------------------------------
# Refusals: named, before anything changes


def broken(how: str) -> nn.Module:
    torch.manual_seed(0)
    model = four_bit(MLP((64, 40, 24)), nested=True)
    last = model.layers[1]
    if how == "fp4":
        model.layers[1] = linear4bit(nn.Linear(40, 24), False, quant_type="fp4")
    elif how == "blocksize":
        model.layers[1] = linear4bit(nn.Linear(40, 24), False, blocksize=32)
    elif how == "no state":
        last.weight.quant_state, last.quant_state = None, None
    elif how == "cpu repack":  # what bnb's CPU eval forward does on an AVX512-BF16 CPU (its rows: a multiple of 32)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        last = model.layers[1] = linear4bit(nn.Linear(64, 32), True)  # (not run: its shape need not fit)
        last.weight.data, last.weight.quant_state = _convert_weight_packed_for_cpu(last.weight.data, last.quant_state)
    elif how == "shape":
        last.weight.quant_state.shape = torch.Size([40, 24])
    elif how == "packed size":  # 480 bytes stand for 960 values, not the 1920 the state says
        last.weight.quant_state.shape = torch.Size([24, 80])
    elif how == "nested code":
        last.weight.quant_state.state2.code = last.weight.quant_state.state2.code[:128]
    return model


REFUSALS = {
    "fp4": "quant_type 'fp4'; minipissa reads NF4 only",
    "blocksize": "blocksize 32",
    "no state": "no quantization state",
    "cpu repack": "repacked for its CPU kernel",
    "shape": r"shape \(40, 24\) in a module of \(out, in\) = \(24, 40\)",
    "packed size": r"480 packed torch.uint8 values for \(24, 80\) \(960 bytes expected\)",
    "nested code": r"nested code map of \(128,\)",
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_unreadable_4bit_layers_are_refused_by_name_with_the_model_unchanged(how, tmp_path):
    model = broken(how)
    stored = model.layers[1].weight.detach().clone()  # (a repacked layer's state dict re-quantizes: not snapshot)
    before = snapshot(model) if how != "cpu repack" else None
    with pytest.raises(StateError, match=f"module 'layers.1' is a 4-bit layer holding .*{REFUSALS[how]}"):
        minipissa.apply(model, 2, "all-linear", quantize="nf4")
    if before is not None:
        assert_unchanged(model, before)
    assert torch.equal(stored, model.layers[1].weight) and not any(True for _ in minipissa.pissa_layers(model))
    if how == "fp4":  # load refuses alike, before changing anything
        good, _ = models(0, torch.float32, True, sizes=(64, 40, 24))
        minipissa.save(minipissa.apply(good, 2, "all-linear"), tmp_path / "a.safetensors")
        with pytest.raises(StateError, match="quant_type 'fp4'"):
            minipissa.load(model, tmp_path / "a.safetensors")
        assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------------------------
# Files, unload, conversion; CUDA (skipped without a GPU)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_save_then_load_onto_a_fresh_copy_of_the_4bit_model_is_bit_exact(quantize, tmp_path):
    """The base fingerprint is of the dequantized weight: load() onto the same 4-bit model rebuilds the layers (and
    re-quantizes the same codes), another 4-bit model is refused; convert_to_lora gives the LoRA for the dequantized
    weights (the same files as from the dequantized copy)."""
    four, plain = models(0, torch.bfloat16, True)
    minipissa.apply(four, 4, "all-linear", quantize=quantize)
    minipissa.apply(plain, 4, "all-linear", quantize=quantize)
    with torch.no_grad():
        for m in (four, plain):
            for _, layer in minipissa.pissa_layers(m):
                layer.B.add_(0.01)
    for name, layer in minipissa.pissa_layers(four):
        weight = dequantized(models(0, torch.bfloat16, True)[0].get_submodule(name).weight)
        assert layer.info["base_fingerprint"] == fingerprint(weight)
    minipissa.save(four, tmp_path / "a.safetensors")
    fresh, _ = models(0, torch.bfloat16, True)
    minipissa.load(fresh, tmp_path / "a.safetensors")
    assert_same_layers(fresh, four)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bits(fresh(x)), bits(four(x)))
    other, _ = models(1, torch.bfloat16, True)
    before = snapshot(other)
    with pytest.raises(StateError, match="fingerprint differs"):
        minipissa.load(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)

    minipissa.convert_to_lora(four, tmp_path / "lora4")
    minipissa.convert_to_lora(plain, tmp_path / "lora")
    got, want = (
        load_file(tmp_path / "lora4/adapter_model.safetensors"),
        load_file(tmp_path / "lora/adapter_model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    config = json.loads((tmp_path / "lora4/adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "lora/adapter_config.json").read_text())


def test_unload_gives_plain_linear_layers_with_the_merged_weight():
    """A Linear4bit's PiSSA layer unloads to an nn.Linear in the dequantized dtype (16 bits: the 4-bit class with a
    dense weight would run bitsandbytes' kernels on a stale quant state), as the dequantized copy unloads."""
    four, plain = models(2, torch.bfloat16, False)
    minipissa.apply(four, 4, "all-linear", quantize="nf4")
    minipissa.apply(plain, 4, "all-linear", quantize="nf4")
    with pytest.raises(RuntimeError, match="4-bit NF4 residual"):
        minipissa.merge(four)
    minipissa.unload(four)
    minipissa.unload(plain)
    for a, b in zip(four.layers, plain.layers, strict=True):
        assert type(a) is nn.Linear and a.weight.dtype == torch.bfloat16
        assert torch.equal(bits(a.weight), bits(b.weight)) and torch.equal(bits(a.bias), bits(b.bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_a_cuda_linear4bit_is_read_as_bnbs_cuda_kernel_dequantizes_it(nested, storage):
    """On the GPU (bitsandbytes quantized it there), dense_weight is bnb's dequantize_4bit bit for bit, and apply()
    with QPiSSA builds the layer on the GPU from it, as from an nn.Linear holding that dequantized weight."""
    from four_bit import bnb

    torch.manual_seed(0)
    layer = linear4bit(nn.Linear(256, 96).to(torch.bfloat16), nested, storage=storage, device="cuda")
    assert layer.weight.device.type == "cuda"
    want = bnb().functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    got = dense_weight(layer, "layer")
    assert got is not None and got.device.type == "cuda" and torch.equal(bits(got), bits(want))
    plain = nn.Sequential(nn.Linear(256, 96, device="cuda").to(torch.bfloat16))
    plain[0].weight, plain[0].bias = nn.Parameter(want.clone()), nn.Parameter(layer.bias.detach().clone())
    four = minipissa.apply(nn.Sequential(layer), 8, "0", quantize="nf4")
    minipissa.apply(plain, 8, "0", quantize="nf4")
    adapted = four[0]
    assert adapted.A.device.type == "cuda" and adapted.weight.codes.device.type == "cuda"
    assert_same_layers(four, plain)  # the same ops on the same bytes on the same device
    x = torch.randn(4, 256, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bits(four(x)), bits(plain(x)))
