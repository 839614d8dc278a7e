"""PiSSALinear: exact init, gradients, merge/unmerge, dtype handling, original/disabled modes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import Conv1D
from torch import nn

import minipissa
from minipissa.nn.layer import PiSSALinear


def make_base(out_f: int, in_f: int, conv1d: bool, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base: nn.Module = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f, bias=bias)
    if conv1d and not bias:
        base.bias = None
    return base.to(dtype)


def adapt(base: nn.Module, rank: int, **kwargs) -> PiSSALinear:
    holder = nn.ModuleDict({"layer": base})
    minipissa.apply(holder, rank, "layer", **kwargs)
    layer = holder["layer"]
    assert isinstance(layer, PiSSALinear)
    return layer


def forward_bound(layer: PiSSALinear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise rounding bound of the layer's forward in x's dtype, against exact arithmetic.

    Every output is a sum of in + r products, rounded a few more times (bias add, scaling, casts of
    A and B and of the stored residual): error <= (in + r + 8) u (|W_res||x| + s|B|(|A||x|) + |bias|),
    the standard gamma_n bound of a dot product, u the unit roundoff of x's dtype, plus the
    subnormal spacing per rounding for results below the normal range.
    """
    u = torch.finfo(x.dtype).eps / 2
    underflow = torch.finfo(x.dtype).smallest_normal * u
    w = layer.weight.double().abs()
    w = w.T if layer.fan_in_fan_out else w
    xa = x.double().abs()
    terms = xa @ w.T + layer.scaling * ((xa @ a.double().abs().T) @ b.double().abs().T)
    if layer.bias is not None:
        terms = terms + layer.bias.double().abs()
    return (layer.in_features + layer.rank + 8) * (u * terms + underflow)


def reference(base_weight: torch.Tensor, base_bias: torch.Tensor | None, x: torch.Tensor, conv1d: bool):
    w = base_weight.double()
    y = x.double() @ (w if conv1d else w.T)
    return y if base_bias is None else y + base_bias.double()


layer_cases = st.fixed_dictionaries(
    {
        "out_f": st.integers(1, 24),
        "in_f": st.integers(1, 24),
        "conv1d": st.booleans(),
        "bias": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
        "alpha": st.one_of(st.none(), st.floats(0.5, 64.0)),
        "rslora": st.booleans(),
        "niter": st.one_of(st.none(), st.integers(0, 3)),
    }
)


@given(case=layer_cases, rank=st.integers(1, 24))
def test_init_reproduces_the_base_output(case, rank):
    rank = min(rank, case["out_f"], case["in_f"])
    base = make_base(case["out_f"], case["in_f"], case["conv1d"], case["bias"], case["dtype"])
    weight, bias = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    layer = adapt(base, rank, alpha=case["alpha"], rslora=case["rslora"], niter=case["niter"])
    x = torch.randn(5, case["in_f"]).to(case["dtype"])
    y = layer(x).double()
    err = (y - reference(weight, bias, x, case["conv1d"])).abs()
    # The decomposition runs in float32/float64 (u_c <= u of the weight dtype), so the residual
    # W - s B0 A0 is off by one rounding of W_res, inside the forward bound.
    assert (err <= forward_bound(layer, x, layer.A, layer.B)).all()
    assert layer.weight.dtype == case["dtype"] and layer.weight.shape == weight.shape
    expected_master = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert layer.A.dtype == layer.A0.dtype == expected_master


FP16_RANK1 = {"out_f": 1, "in_f": 2, "conv1d": False, "bias": False, "dtype": torch.float16}


@given(case=layer_cases, rank=st.integers(1, 24))
@example(case={**FP16_RANK1, "alpha": None, "rslora": False, "niter": None}, rank=1).via("subnormal residual")
def test_init_error_of_the_weight_is_one_rounding(case, rank):
    rank = min(rank, case["out_f"], case["in_f"])
    base = make_base(case["out_f"], case["in_f"], case["conv1d"], False, case["dtype"])
    w = base.weight.detach().double().clone()
    layer = adapt(base, rank, alpha=case["alpha"], rslora=case["rslora"], niter=case["niter"])
    delta = layer.scaling * (layer.B0.double() @ layer.A0.double())
    rebuilt = layer.weight.double() + (delta.T if case["conv1d"] else delta)
    # W_res = round_d(W - P) with P computed in u_c (r-term products): |W_res + P - W| <=
    # u_d |W - P| + (r + 2) u_c |s||B0||A0|, elementwise.
    u_d, u_c = torch.finfo(case["dtype"]).eps / 2, torch.finfo(layer.A0.dtype).eps / 2
    p_abs = layer.scaling * (layer.B0.double().abs() @ layer.A0.double().abs())
    p_abs = p_abs.T if case["conv1d"] else p_abs
    # Values below the dtype's normal range round to a fixed grid: add half its spacing (fp16: 3e-8).
    underflow = torch.finfo(case["dtype"]).smallest_normal * torch.finfo(case["dtype"]).eps / 2
    bound = u_d * (w - (rebuilt - layer.weight.double())).abs() + (rank + 2) * u_c * p_abs + underflow
    assert ((rebuilt - w).abs() <= bound * 1.01).all()


def full_rank_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), Conv1D(10, 16))


def test_gradients_reach_only_a_and_b_and_a_step_moves_the_output():
    model = minipissa.apply(full_rank_model(), 4, ["0", "2"])
    x = torch.randn(8, 12)
    before = model(x).detach()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in ("A", "B")
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name
    for name, buf in model.named_buffers():
        assert not buf.requires_grad, name
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.1).step()
    assert not torch.allclose(model(x), before)


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(scale * torch.randn(layer.A.shape, generator=g))
            layer.B.add_(scale * torch.randn(layer.B.shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_and_unmerge_is_exact_without_drift(dtype):
    model = minipissa.apply(full_rank_model().to(dtype), 4, ["0", "2"]).eval()  # merged layers: inference only
    perturb(model)
    x = torch.randn(6, 12).to(dtype)
    inputs = [x, torch.tanh(model[0](x))]
    layers = [model[0], model[2]]
    unmerged = [layer(inp) for layer, inp in zip(layers, inputs, strict=True)]
    bounds = [forward_bound(layer, inp, layer.A, layer.B) for layer, inp in zip(layers, inputs, strict=True)]
    residuals = [layer.weight.detach().clone() for layer in layers]
    y = model(x)
    minipissa.merge(model)
    u = torch.finfo(dtype).eps / 2
    for layer, inp, before, bound in zip(layers, inputs, unmerged, bounds, strict=True):
        assert layer.merged
        # Both forwards are within their rounding bounds of the same exact function; the merged one
        # also carries one rounding of the merged weight (u |W_merged| |x|) and has no adapter terms.
        w = layer.weight.double().abs()
        merged_bound = (layer.in_features + 8) * u * (inp.double().abs() @ (w if layer.fan_in_fan_out else w.T))
        merged_bound += layer.bias.double().abs() * (layer.in_features + 8) * u
        assert ((layer(inp).double() - before.double()).abs() <= bound + merged_bound).all()
    for _ in range(1000):
        minipissa.merge(model)
        minipissa.unmerge(model)
    for layer, residual in zip(layers, residuals, strict=True):
        assert not layer.merged and torch.equal(layer.weight, residual)
    assert torch.equal(model(x), y)


def test_original_and_disabled_modes():
    base = full_rank_model()
    model = minipissa.apply(copy.deepcopy(base), 4, ["0", "2"])
    perturb(model, scale=0.5)
    x = torch.randn(6, 12)
    with minipissa.original(model):
        y_original = model(x)
    assert torch.allclose(y_original, base(x), rtol=0, atol=1e-5)
    assert not torch.allclose(model(x), base(x), atol=1e-3)
    with minipissa.disabled(model):
        y_disabled = model(x)
    residual_only = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10)
    )  # the residual weights as plain layers
    with torch.no_grad():
        residual_only[0].weight.copy_(model[0].weight)
        residual_only[0].bias.copy_(model[0].bias)
        residual_only[2].weight.copy_(model[2].weight.T)
        residual_only[2].bias.copy_(model[2].bias)
    assert torch.allclose(y_disabled, residual_only(x), atol=1e-6)
    assert all(layer.mode == "adapter" for _, layer in minipissa.pissa_layers(model))
    minipissa.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), minipissa.original(model):
        pass
    minipissa.unmerge(model)
    with minipissa.disabled(model), torch.no_grad():  # merged inside the context: the layer's forward refuses
        minipissa.merge(model)
        with pytest.raises(RuntimeError, match=r"minipissa.disabled\(\): the model is merged; call minipissa.unmerge"):
            model(x)


def test_to_bfloat16_keeps_adapter_dtypes_and_original_within_bf16_rounding():
    base = full_rank_model()
    model = minipissa.apply(copy.deepcopy(base), 4, ["0", "2"])
    perturb(model)
    model.to(torch.bfloat16)
    for _, layer in minipissa.pissa_layers(model):
        assert layer.weight.dtype == torch.bfloat16
        assert layer.A.dtype == layer.B.dtype == layer.A0.dtype == layer.B0.dtype == torch.float32
    first = model[0]
    x = torch.randn(6, 12).to(torch.bfloat16)
    with minipissa.original(model):
        y = first(x).double()
    # Against the fp32 base layer evaluated exactly on the same bf16 input: one bf16 rounding of
    # W_res (<= u|W - P|, P the principal part) plus the bf16 forward bound.
    exact = x.double() @ base[0].weight.double().T + base[0].bias.double()
    u = torch.finfo(torch.bfloat16).eps / 2
    bound = forward_bound(first, x, first.A0, first.B0) + u * (x.double().abs() @ base[0].weight.double().abs().T)
    assert ((y - exact).abs() <= 2 * bound).all()
    model.double()
    assert model[0].A.dtype == torch.float32 and model[0].weight.dtype == torch.float64


def test_dropout_applies_to_the_adapter_input_only():
    model = minipissa.apply(full_rank_model(), 4, ["0"], dropout=0.5)
    x = torch.randn(64, 12)
    model.train()
    with minipissa.disabled(model):
        assert torch.equal(model(x), model(x))
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_unload_restores_the_classes_with_merged_weights():
    model = minipissa.apply(full_rank_model(), 4, ["0", "2"])
    perturb(model)
    x = torch.randn(6, 12)
    y = model(x)
    minipissa.unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is Conv1D
    assert not list(minipissa.pissa_layers(model))
    assert set(model.state_dict()) == set(full_rank_model().state_dict())
    assert torch.allclose(model(x), y, atol=1e-5)


def test_constructor_rejects_factors_of_the_wrong_shape():
    base = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"\(6, 8\)"):
        PiSSALinear(base, torch.zeros(2, 7), torch.zeros(6, 2), alpha=2.0)


def test_unfrozen_bias_and_residual_get_gradients():
    # Users may train biases (or the residual) next to the adapter; the fused fast path must not drop them.
    model = minipissa.apply(full_rank_model(), 4, ["0", "2"])
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m[0].bias.requires_grad_(True)
        m[2].weight.requires_grad_(True)
    x = torch.randn(8, 12)
    model(x).square().mean().backward()
    assert model[0].bias.grad is not None and model[2].weight.grad is not None

    # Against autograd through the plain formula.
    def plain(layer, inp):
        w = layer.weight.T if layer.fan_in_fan_out else layer.weight
        return inp @ w.T + layer.bias + layer.scaling * (inp @ layer.A.T) @ layer.B.T

    plain(reference[2], torch.tanh(plain(reference[0], x))).square().mean().backward()
    assert torch.allclose(model[0].bias.grad, reference[0].bias.grad, atol=1e-6)
    assert torch.allclose(model[2].weight.grad, reference[2].weight.grad, atol=1e-6)


def test_initial_factors_live_on_the_host_outside_the_buffers_and_load_with_the_state_dict():
    torch.manual_seed(0)
    model = minipissa.apply(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), 4, ["0", "2"])
    layer = model[0]
    assert layer.A0.device.type == layer.B0.device.type == "cpu"
    assert not {n for n, _ in model.named_buffers()} & {"0.A0", "0.B0", "2.A0", "2.B0"}  # DDP broadcasts buffers
    state = model.state_dict()
    assert torch.equal(state["0.A0"], layer.A0) and torch.equal(state["2.B0"], model[2].B0)
    a0_before = layer.A0.clone()
    # Another init (another seed), then the first model's state: A0 and B0 come back exactly, in their own tensors.
    torch.manual_seed(0)
    other = minipissa.apply(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), 4, ["0", "2"], init="lora")
    assert not torch.equal(other[0].A0, a0_before)
    other.load_state_dict(state)
    assert torch.equal(other[0].A0, a0_before) and torch.equal(other[2].B0, model[2].B0)
    assert other[0].A0.data_ptr() != layer.A0.data_ptr()
    x = torch.randn(3, 12)
    with torch.no_grad(), minipissa.original(model), minipissa.original(other):
        assert torch.equal(other(x), model(x))
    # strict loading names a missing A0 and a wrong shape, as it does for buffers
    partial = {k: v for k, v in state.items() if k != "2.A0"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*2\.A0"):
        other.load_state_dict(partial)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.B0"):
        other.load_state_dict(state | {"0.B0": torch.zeros(3, 3)})
    assert other.load_state_dict(partial, strict=False).missing_keys == ["2.A0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_initial_factors_stay_on_the_host_of_a_gpu_model_and_original_still_matches_the_base():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).cuda()
    x = torch.randn(5, 64, device="cuda")
    expected = base(x).detach()
    model = minipissa.apply(copy.deepcopy(base), 8, ["0", "2"], niter=4)
    layer = model[0]
    assert layer.A.is_cuda and not layer.A0.is_cuda and not layer.B0.is_cuda
    for t in (layer.A0, layer.B0, model[2].A0):  # each its own storage (one shared by all would break safetensors)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    model.cpu().cuda()  # device moves leave them where they are
    assert not layer.A0.is_cuda
    with torch.no_grad():
        model[0].A.add_(1.0)  # training moved A: original() must not use it
        with minipissa.original(model):
            assert layer.initial_on_device is not None and layer.initial_on_device[0].is_cuda
            got = model(x)
        assert layer.initial_on_device is None
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_layer_pickled_by_minipissa_0_1_0_unpickles_as_one_adapter_named_default() -> None:
    """0.1.0's layers held one adapter and none of what several need (its name, the order, the factors W_res was
    made from, the correction buffers): unpickled now, they compute as before, and take a second adapter."""
    import pickle

    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    minipissa.apply(model, 3, ["0", "2"])
    x = torch.randn(4, 12)
    y = model(x)
    for _, layer in minipissa.pissa_layers(model):  # what 0.1.0 pickled
        for key in ("adapter_name", "active", "order", "residual_init"):
            del layer.__dict__[key]
        for key in ("correction_a", "correction_b"):
            del layer._buffers[key]
    old = pickle.loads(pickle.dumps(model))
    assert torch.equal(old(x), y)
    assert list(minipissa.adapters(old)) == ["default"] and minipissa.active_adapter(old) == "default"
    minipissa.apply(old, 2, ["0", "2"], name="b", seed=1)
    with minipissa.adapter(old, "b"):
        torch.testing.assert_close(old(x), y, rtol=1e-5, atol=1e-5)  # a PiSSA init: the outputs unchanged
    assert torch.equal(old(x), y)  # "default" active again, bit for bit


def test_a_layer_pickled_without_its_order_of_adapters_gets_one() -> None:
    """0.2.0 gave a layer its order of adapters only in apply()/load(): one built by hand and pickled has none."""
    import pickle

    layer = PiSSALinear(nn.Linear(8, 6), torch.randn(2, 8), torch.randn(6, 2), alpha=2.0)
    del layer.__dict__["order"]
    back = pickle.loads(pickle.dumps(layer))
    assert back.order == ["default"] and minipissa.nn.adapters.names(back) == ["default"]
