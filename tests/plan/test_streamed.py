"""The streaming init (apply(..., device=...)): the same factors, residuals and codes as the in-place init on the same
device, bit for bit, on every road of the factor stream; the host weights released; the split model usable."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import seams
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import MLP, Conv1D
from snapshots import assert_unchanged, same_bits, snapshot
from torch import nn

import minipissa
from minipissa import NF4Linear
from minipissa.core.nf4 import NF4Weight

CUDA = torch.cuda.is_available()


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Conv1D(40, 24), nn.Tanh(), Conv1D(24, 40), nn.Tanh(), nn.Linear(24, 16))


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return MLP((32, 48, 48, 24)).to(dtype)


ROADS = {
    "exact": {},
    "randomized": {"niter": 2},
    "stacked": {"stack": True},
    "stacked-randomized": {"stack": True, "niter": 2},
    "nf4": {"quantize": "nf4"},
    "nf4-iters2": {"quantize": "nf4", "quant_iters": 2, "niter": 2},
    "nf4-stacked-iters2": {"quantize": "nf4", "quant_iters": 2, "stack": True},
    "lora": {"init": "lora"},
    "qlora": {"init": "lora", "quantize": "nf4"},
    "loftq": {"init": "loftq", "quantize": "nf4", "quant_iters": 2},
    "nf4-dq": {"quantize": "nf4", "double_quant": True},
    "nf4-dq-stacked-iters2": {"quantize": "nf4", "double_quant": True, "quant_iters": 2, "stack": True, "niter": 1},
    "loftq-dq": {"init": "loftq", "quantize": "nf4", "double_quant": True, "quant_iters": 2},
}


@pytest.fixture
def streamed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the streamed road, so that a test knows it ran (not the in-place one)."""
    calls: list[int] = []
    real = seams.real("streamed factors")

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    seams.replace(monkeypatch, "streamed factors", spy)
    return calls


def assert_same_adapters(a: nn.Module, b: nn.Module) -> None:
    """Same state (A, B, A0, B0, residuals or codes and absmax, the rest) bit for bit, and the same layer info
    (fingerprints, singular values, quantization errors) but the init time."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert same_bits(sa[key], sb[key]), key
    layers_a, layers_b = list(minipissa.pissa_layers(a)), list(minipissa.pissa_layers(b))
    assert [n for n, _ in layers_a] == [n for n, _ in layers_b] and layers_a
    for (_, la), (_, lb) in zip(layers_a, layers_b, strict=True):
        assert la.info == lb.info
        assert la.weight_kind is lb.weight_kind


@pytest.mark.parametrize("road", list(ROADS))
@pytest.mark.parametrize("build", [mlp, conv_model], ids=["linear", "conv1d"])
def test_streaming_to_the_cpu_gives_the_in_place_init_bit_for_bit(road, build, streamed_calls):
    options = dict(ROADS[road])
    config = minipissa.InitConfig(rank=4, **options)
    in_place, streamed = build(), build()
    minipissa.apply(in_place, config=config, targets="all-linear")
    assert not streamed_calls
    minipissa.apply(streamed, config=config, targets="all-linear", device="cpu")
    assert streamed_calls
    assert_same_adapters(in_place, streamed)
    x = torch.randn(5, 32 if build is mlp else 24)
    assert torch.equal(in_place(x), streamed(x))


# float32 and bfloat16 weights; residuals are made in the weight's dtype (dense) or quantized from float32 (NF4)
@settings(max_examples=6)
@given(
    sizes=st.lists(st.integers(8, 40), min_size=2, max_size=4),
    rank=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    niter=st.sampled_from([None, 1]),
    quantize=st.sampled_from([None, "nf4"]),
    stack=st.booleans(),
)
def test_streamed_equals_in_place_for_drawn_models(sizes, rank, dtype, niter, quantize, stack):
    rank = min(rank, *sizes)
    torch.manual_seed(len(sizes))
    model = MLP(tuple(sizes)).to(dtype)
    config = minipissa.InitConfig(rank=rank, niter=niter, quantize=quantize, stack=stack)
    twin = copy.deepcopy(model)
    minipissa.apply(model, config=config, targets="all-linear")
    minipissa.apply(twin, config=config, targets="all-linear", device=torch.device("cpu"))
    assert_same_adapters(model, twin)


@pytest.mark.parametrize("road", ["nf4-dq", "nf4-dq-stacked-iters2", "loftq-dq"])
def test_a_streamed_double_quantized_residual_is_the_in_place_one_and_is_double_quantized(road):
    config = minipissa.InitConfig(rank=4, **ROADS[road])
    in_place, streamed, single = mlp(), mlp(), mlp()
    minipissa.apply(in_place, config=config, targets="all-linear")
    minipissa.apply(streamed, config=config, targets="all-linear", device="cpu")
    assert_same_adapters(in_place, streamed)
    options = {k: v for k, v in ROADS[road].items() if k != "double_quant"}
    minipissa.apply(single, config=minipissa.InitConfig(rank=4, **options), targets="all-linear", device="cpu")
    for (_, dq), (_, plain) in zip(minipissa.pissa_layers(streamed), minipissa.pissa_layers(single), strict=True):
        assert dq.weight.double_quant and not plain.weight.double_quant
        # The 8-bit absmax is stored (not the float32 one); it decodes near the single-quantized absmax. The codes
        # may differ where the iterations (quant_iters > 1) saw the other quantizer.
        assert {"weight.absmax_codes", "weight.absmax_scale"} <= set(dq.state_dict())
        assert "weight.absmax" not in dq.state_dict()
        if road == "nf4-dq":  # one pass: the same factors, so the same 4-bit codes (dq changes only statistics)
            assert torch.equal(dq.weight.codes, plain.weight.codes)
            exact = plain.weight.absmax_values()
            # half a code step of the widest group (layers here have <= 256 blocks: one group), plus float32 slack
            step = (exact.max() - exact.min()) / 255
            assert (dq.weight.absmax_values() - exact).abs().max() <= step / 2 * 1.001 + 1e-6


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_four_bit_target_streams_as_it_decomposes_in_place(double_quant):
    """An NF4Linear target (plan/quantized_base.py): its dequantized weight fetched like any other, QPiSSA again."""
    torch.manual_seed(0)
    base = nn.Linear(96, 256)
    weight = NF4Weight.quantized(base.weight.detach().to(torch.bfloat16), double_quant=double_quant)
    four = nn.Sequential(NF4Linear(base, weight, base.bias.detach().to(torch.bfloat16), False), nn.Linear(256, 8))
    twin = copy.deepcopy(four)
    options = {"quantize": "nf4", "double_quant": double_quant, "niter": 2}
    minipissa.apply(four, 8, "0", **options)
    minipissa.apply(twin, 8, "0", device="cpu", **options)
    assert isinstance(twin[0], minipissa.PiSSALinear) and twin[0].weight.double_quant == double_quant
    assert_same_adapters(four, twin)


def test_the_host_weights_of_the_targets_are_released():
    model = mlp()
    refs = [weakref.ref(layer.weight) for layer in model.layers]
    kept = weakref.ref(model.layers[0].bias)  # the bias goes into the layer (moved to the device: a copy on a GPU)
    minipissa.apply(model, 4, "all-linear", device="cpu", quantize="nf4")
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert kept() is model.layers[0].bias  # on the CPU the bias is the module's own, taken over


def test_model_to_after_a_streamed_init_moves_nothing_twice():
    model = nn.Sequential(mlp(), nn.LayerNorm(24))
    minipissa.apply(model, 4, "all-linear", device="cpu", quantize="nf4")
    layer = model[0].layers[0]
    before = {k: v.data_ptr() for k, v in layer.state_dict().items()}
    model.to("cpu")
    assert {k: v.data_ptr() for k, v in layer.state_dict().items()} == before
    assert layer.A0.device.type == "cpu" and layer.A.device.type == "cpu"


@pytest.mark.parametrize("device", ["cuda:99", "meta", "xla", 3.5, "not a device"])
def test_a_bad_device_is_refused_before_anything_changes(device):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="device="):
        minipissa.apply(model, 4, "all-linear", device=device)
    assert_unchanged(model, before)


@pytest.mark.skipif(CUDA, reason="the refusal of CUDA where there is none")
def test_cuda_without_cuda_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"sees 0 CUDA device\(s\)"):
        minipissa.apply(model, 4, "all-linear", device="cuda")


def test_a_nan_weight_is_refused_on_the_streamed_road_too():
    model = mlp()
    with torch.no_grad():
        model.layers[2].weight[1, 2] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'layers.2' have NaN or infinite weights; nothing was changed"):
        minipissa.apply(model, 4, "all-linear", device="cpu")
    assert_unchanged(model, before)


def test_everything_else_works_after_a_streamed_init(tmp_path):
    """save/load, save_residual/load_residual, convert_to_lora, summary, merge and unload."""
    model = mlp()
    reference = copy.deepcopy(model)
    minipissa.apply(model, 4, "all-linear", device="cpu", niter=2)
    x = torch.randn(3, 32)
    with torch.no_grad():
        model.layers[0].B.add_(0.01)
    minipissa.save(model, tmp_path / "a.safetensors")
    loaded = minipissa.load(copy.deepcopy(reference), tmp_path / "a.safetensors")
    assert torch.equal(loaded(x), model(x))
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    residual = minipissa.load_residual(copy.deepcopy(reference), tmp_path / "r.safetensors")
    minipissa.load(residual, tmp_path / "a.safetensors", base="residual")
    assert torch.equal(residual(x), model(x))
    report = minipissa.convert_to_lora(tmp_path / "a.safetensors", tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file() and report is not None
    assert "3 adapted modules" in str(minipissa.summary(model))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        minipissa.merge(model)
        assert torch.allclose(model(x), expected, atol=1e-5)
        minipissa.unmerge(model)
        plain = minipissa.unload(model)
        assert not list(minipissa.pissa_layers(plain)) and torch.allclose(plain(x), expected, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    "road", ["exact", "randomized", "stacked-randomized", "nf4-iters2", "loftq", "qlora", "nf4-dq-stacked-iters2"]
)
def test_streaming_to_cuda_gives_the_in_place_cuda_init_bit_for_bit(road, streamed_calls):
    config = minipissa.InitConfig(rank=4, **ROADS[road])
    host, on_gpu = mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16).cuda()
    minipissa.apply(on_gpu, config=config, targets="all-linear")
    minipissa.apply(host, config=config, targets="all-linear", device="cuda")
    assert streamed_calls
    layer = host.layers[0]
    assert layer.A.is_cuda and layer.A0.device.type == "cpu" and layer.bias.is_cuda
    host.to("cuda")  # the rest (nothing here) follows; the layers stay as they are
    assert_same_adapters(on_gpu, host)
    x = torch.randn(4, 32, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(on_gpu(x), host(x))
