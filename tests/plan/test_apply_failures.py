"""apply() and the whole-model verbs when something is wrong or unusual: a failure leaves the model exactly as it
was, and what used to go silently wrong (bypassed, aliased or tied modules, in-place ops, pickling, training a
merged model) is either right or a named error."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import seams
import torch
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError


def stack(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)


TARGETS = ["0", "2", "4"]


# ---- a failure before the last step changes nothing -----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("niter", [None, 2])
def test_a_nonfinite_weight_in_the_last_target_leaves_the_model_bit_identical(bad, niter):
    model = stack()
    with torch.no_grad():
        model[4].weight[3, 5] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'4' have NaN or infinite weights; nothing was changed"):
        minipissa.apply(model, 4, TARGETS, niter=niter)
    assert_unchanged(model, before)
    assert not list(minipissa.pissa_layers(model))


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("conv1d", [False, True])
def test_a_float16_residual_that_would_overflow_is_refused_before_anything_changes(quantize, conv1d):
    """Finite float16 weights near 65504, with no low-rank structure: W - s·B0·A0 leaves float16's range."""
    from transformers.pytorch_utils import Conv1D

    model = stack(dtype=torch.float16)
    if conv1d:
        model[4] = Conv1D(8, 24).half()
    with torch.no_grad():
        model[4].weight.copy_(
            65000 * torch.randn(model[4].weight.shape, generator=torch.Generator().manual_seed(0)).sign()
        )
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['4'\]: the residual W - s·B0·A0 leaves the weight dtype's range"):
        minipissa.apply(model, 4, TARGETS, quantize=quantize)
    assert_unchanged(model, before)
    assert not list(minipissa.pissa_layers(model))


def test_a_float16_residual_that_overflows_by_a_small_minor_part_is_refused():
    """MiLoRA keeps the bottom triplets, here of singular values ~500 (s·||A0||·||B0|| far below 65504): entries of W
    just under 65504 leave the range by that small part, which only the weight's own term of the bound sees."""
    g = torch.Generator().manual_seed(0)
    signs = torch.randn(8, 1, generator=g).sign() * torch.randn(1, 24, generator=g).sign()
    model = nn.Sequential(nn.Linear(24, 8)).half()
    with torch.no_grad():
        model[0].weight.copy_(signs * (65504 - 200 * torch.randn(8, 24, generator=g).abs()))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['0'\]: the residual W - s·B0·A0 leaves the weight dtype's range"):
        minipissa.apply(model, 4, ["0"], components="minor")
    assert_unchanged(model, before)


def test_the_overflow_bound_counts_the_scaling():
    """Factors made elsewhere (an imported adapter) with s = 64: s·B0·A0 = 64 * 2000 overflows a zero weight."""
    from minipissa.plan.factors import Factors, overflowing_residuals
    from minipissa.plan.settings import Settings
    from minipissa.plan.tree import Plan

    module = nn.Linear(6, 5).half()
    with torch.no_grad():
        module.weight.zero_()
    plan = Plan("head", module, Settings(rank=1, alpha=64.0, rslora=False, fan_in_fan_out=False))
    a0, b0 = torch.full((1, 6), 2000**0.5), torch.full((5, 1), 2000**0.5)
    prints = {"head": {"sumsq": 0.0}}
    assert overflowing_residuals([Factors(plan, a0, b0, torch.ones(1))], prints) == ["head"]
    assert overflowing_residuals([Factors(plan, a0 / 2, b0 / 2, torch.ones(1))], prints) == []  # 32000 fits


def test_float16_weights_near_the_range_edge_whose_residual_fits_are_adapted(tmp_path):
    """A weight whose bound reaches 65504 but whose residual fits (a rank-1 matrix of 60000s: W_res ~ 0) is adapted,
    the bound only chooses which residuals are computed before the layers are put in place."""
    model = stack(dtype=torch.float16)
    with torch.no_grad():
        model[4].weight.fill_(60000.0)
    minipissa.apply(model, 4, TARGETS)
    assert bool(torch.isfinite(model[4].weight).all())
    minipissa.save(model, tmp_path / "a.safetensors")
    base = stack(dtype=torch.float16)
    with torch.no_grad():
        base[4].weight.fill_(60000.0)
    x = torch.randn(2, 16).half()
    assert torch.equal(minipissa.load(base, tmp_path / "a.safetensors")(x), model(x))


@pytest.mark.parametrize("error", [torch.linalg.LinAlgError("did not converge"), KeyboardInterrupt(), MemoryError()])
def test_a_decomposition_that_fails_on_the_last_module_leaves_the_model_and_a_retry_works(monkeypatch, error):
    model = stack()
    before = snapshot(model)
    calls = []
    real = seams.real("decomposition")

    def failing(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        if len(calls) == 3:
            raise error
        return real(matrix, *args, **kwargs)

    seams.replace(monkeypatch, "decomposition", failing)
    expected = RuntimeError if isinstance(error, Exception) else type(error)
    with pytest.raises(expected) as caught:
        minipissa.apply(model, 4, TARGETS)
    if expected is RuntimeError:  # an error names the module; an interrupt is passed on as it is
        assert "'4'" in str(caught.value) and type(error).__name__ in str(caught.value)
    assert_unchanged(model, before)
    monkeypatch.undo()
    x = torch.randn(3, 16)
    y = model(x)
    minipissa.apply(model, 4, TARGETS)  # no "already is a PiSSALinear": nothing was swapped
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_nonfinite_factors_are_refused_before_anything_changes(monkeypatch):
    """Defence in depth behind the weight and scaling checks: factors that overflowed anyway (e.g. a Gram of
    huge weights in float32) are refused with the module's name, the model untouched."""
    model = stack()
    before = snapshot(model)
    real = seams.real("decomposition")

    def overflowing(matrix, *args, **kwargs):
        a, b, s = real(matrix, *args, **kwargs)
        return (a * float("inf"), b, s) if matrix.shape == (8, 24) else (a, b, s)

    seams.replace(monkeypatch, "decomposition", overflowing)
    with pytest.raises(ValueError, match=r"'4' have NaN or infinite initial factors .*; nothing was changed"):
        minipissa.apply(model, 4, TARGETS)
    assert_unchanged(model, before)


@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30])
@pytest.mark.parametrize("niter", [None, 2])
def test_finite_weights_too_large_for_float32_are_named_as_such_with_their_size(scale, niter):
    """Weights of 1e20-1e30 are finite: their squares overflow float32 (the fingerprint's sums, the Gram), which
    used to be reported as "NaN or infinite weights". float64 computes them, as the error says."""
    model = stack()
    with torch.no_grad():
        model[4].weight.mul_(scale)
    largest = model[4].weight.abs().max().item()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'4' \(max \|value\| = (\S+)\) have finite weights too large") as caught:
        minipissa.apply(model, 4, TARGETS, niter=niter)
    assert float(caught.value.args[0].split("= ")[1].split(")")[0]) == pytest.approx(largest, rel=1e-2)
    assert "NaN" not in str(caught.value) and "model.double()" in str(caught.value)
    assert_unchanged(model, before)
    x = torch.randn(3, 16, dtype=torch.float64)
    y = model.double()(x)
    minipissa.apply(model, 4, TARGETS, niter=niter)
    torch.testing.assert_close(model(x), y, rtol=1e-9, atol=0.0)


def test_initial_factors_that_overflow_for_large_weights_say_so(monkeypatch):
    """Weights whose fingerprint is finite but whose products (m·n squares) pass float32's max: factors that come
    out infinite are refused as weights too large, not as NaN."""
    model = stack()
    with torch.no_grad():
        model[4].weight.fill_(3e18)  # rows sum 24 squares (2.2e38, finite); 8·24 of them pass 3.4e38
    real = seams.real("decomposition")

    def overflowing(matrix, *args, **kwargs):
        a, b, s = real(matrix, *args, **kwargs)
        return (a * float("inf"), b, s) if matrix.shape == (8, 24) else (a, b, s)

    seams.replace(monkeypatch, "decomposition", overflowing)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'4' \(max \|value\| = 3e\+18\) have finite weights too large.*initial fac"):
        minipissa.apply(model, 4, TARGETS)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("bad", "pattern"), [(float("nan"), "NaN or infinite biases"), (1e20, "finite biases too")])
def test_a_bias_that_is_not_finite_or_too_large_is_refused_at_apply(bad, pattern):
    """The biases are fingerprinted with the weights (a file must read back): NaN and overflow are refused."""
    model = stack()
    with torch.no_grad():
        model[2].bias[1:] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"'2'.* {pattern}"):
        minipissa.apply(model, 4, TARGETS)
    assert_unchanged(model, before)


@pytest.mark.parametrize("error", [MemoryError("out of memory"), KeyboardInterrupt()])
def test_a_failure_while_the_layers_are_put_in_place_names_what_was_done(monkeypatch, error):
    """The one step that can stop midway (every factor exists; an out-of-memory or Ctrl-C while the residuals
    are written): the adapted modules are exact PiSSA layers, the others untouched, and the error says which."""
    model = stack()
    x = torch.randn(3, 16)
    y = model(x)
    build = seams.real("layer builder")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return build(*args, **kwargs)

    seams.replace(monkeypatch, "layer builder", failing)
    with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else RuntimeError) as caught:
        minipissa.apply(model, 4, TARGETS)
    text = str(caught.value) + " ".join(getattr(caught.value, "__notes__", []))
    assert "adapted so far (exact PiSSA layers): ['0']; left as they were: ['2', '4']" in text
    assert isinstance(model[0], minipissa.PiSSALinear) and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("alpha", "rslora"), [(float("inf"), False), (1e-38, False), (1e300, False), (float("nan"), True), (1e-30, True)]
)
def test_scalings_whose_factors_would_overflow_are_refused(alpha, rslora):
    model = stack()
    before = snapshot(model)
    with pytest.raises(ValueError, match="module '0' alpha must be"):
        minipissa.apply(model, 4, TARGETS, alpha=alpha, rslora=rslora)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"alpha": "8"}, ValueError, "module '0' alpha must be a finite number"),
        ({"alpha": {"*": None}}, ValueError, "module '0' alpha must be a finite number"),
        ({"targets": 123}, TypeError, "`targets` must be a module name"),
        ({"targets": "re:(unclosed"}, ValueError, "not a valid regex"),
        ({"exclude": "nope"}, ValueError, r"exclude pattern\(s\) \['nope'\] match no module"),
        ({"adapter_dtype": torch.int8}, ValueError, "adapter_dtype must be a floating-point"),
        ({"oversample": 2.5, "niter": 1}, ValueError, "oversample must be >= 0"),
        ({"niter": True}, ValueError, "niter must be None"),
        ({"seed": 1.5}, ValueError, "seed must be an int"),
        # What an adapter file holds (int64), no more: save() could not write what load() reads back.
        ({"seed": 2**63}, ValueError, r"seed must be an int in \[-2\*\*63, 2\*\*63\)"),
        ({"seed": -(2**63) - 1}, ValueError, r"seed must be an int in \[-2\*\*63"),
        ({"niter": 2**63, "init": "lora"}, ValueError, r"niter must be None \(exact SVD\) or an int in \[0, 2\*\*63\)"),
        ({"niter": 1, "oversample": 2**63}, ValueError, r"oversample must be >= 0 and < 2\*\*63"),
        ({"quantize": "nf4", "quant_iters": 2**63}, ValueError, r"quant_iters must be an int in \[1, 2\*\*63\)"),
        ({"memory_budget": 0}, ValueError, "memory_budget must be a positive int"),
        ({"fan_in_fan_out": True}, ValueError, r"fan_in_fan_out=True contradicts module '0', a Linear"),
    ],
)
def test_bad_options_are_named_and_change_nothing(kwargs, error, pattern):
    model = stack()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        minipissa.apply(model, **{"rank": 4, "targets": TARGETS, **kwargs})
    assert_unchanged(model, before)


# ---- what used to be silently wrong ----------------------------------------------------------------------------


def test_in_place_ops_on_adapted_outputs_train():
    """The adapted layer's output is no view, so ReLU(inplace=True), +=, slice assignment and relu_ work, and
    the gradients equal those of the same computation on the unadapted model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 8))
    model = minipissa.apply(copy.deepcopy(base), 4, ["0", "2"])
    x = torch.randn(3, 5, 16)
    grads = []
    for net in (base, model):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        y += 1
        y[:, 0] = 0
        y.relu_().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    assert model[0].A.grad is not None and model[0].A.grad.abs().sum() > 0


def test_an_adapted_model_pickles_and_deep_copies_independently(tmp_path):
    model = minipissa.apply(stack(dtype=torch.bfloat16), 4, TARGETS)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = model(x)
    again = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own pickle, just made
    twin = copy.deepcopy(model)
    for other in (again, loaded, twin):
        assert torch.equal(other(x), y)
        assert other[0].shared_casts is not None and other[0].shared_casts is not model[0].shared_casts
        assert all(layer.shared_casts is other[0].shared_casts for _, layer in minipissa.pissa_layers(other))
    # The copy's hooks hold the copy's layers: the original can go, and the copy trains on its own.
    ref = weakref.ref(model[0])
    del model, again, loaded
    gc.collect()
    assert ref() is None
    with torch.no_grad():
        twin[0].A.add_(1.0)
    assert not torch.equal(twin(x), y)


def test_a_merged_model_refuses_to_train_and_its_adapters_take_no_gradient():
    model = minipissa.apply(stack(), 4, TARGETS)
    minipissa.merge(model)
    assert not any(p.requires_grad for _, layer in minipissa.pissa_layers(model) for p in (layer.A, layer.B))
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        model(torch.randn(2, 16))
    with torch.no_grad():
        model(torch.randn(2, 16))  # inference is what merging is for
    model.eval()(torch.randn(2, 16))
    minipissa.unmerge(model)
    assert all(p.requires_grad for _, layer in minipissa.pissa_layers(model) for p in (layer.A, layer.B))
    model.train()(torch.randn(2, 16)).sum().backward()


@pytest.mark.parametrize("verb", ["merge", "unmerge", "unload", "original", "disabled", "save", "save_residual"])
def test_every_verb_on_a_model_never_adapted_raises_the_same_error(verb, tmp_path):
    model = stack()
    before = snapshot(model)
    call = {
        "original": lambda: minipissa.original(model).__enter__(),
        "disabled": lambda: minipissa.disabled(model).__enter__(),
        "save": lambda: minipissa.save(model, tmp_path / "a.safetensors"),
        "save_residual": lambda: minipissa.save_residual(model, tmp_path / "r.safetensors"),
    }.get(verb, lambda: getattr(minipissa, verb)(model))
    with pytest.raises(StateError, match=f"minipissa.{verb}: the model has no PiSSA layers"):
        call()
    assert_unchanged(model, before)
    assert not list(tmp_path.iterdir())
    assert minipissa.summary(model).modules == []  # a report of nothing is an answer, not an error


def test_multihead_attention_out_proj_is_refused_and_all_linear_skips_it():
    """nn.MultiheadAttention reads out_proj.weight itself: an adapter there would never run (the output changed
    by 0.42 at init before)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="'self_attn.out_proj' is the out_proj of an nn.MultiheadAttention"):
        minipissa.apply(layer, 4, "out_proj")
    assert_unchanged(layer, before)
    minipissa.apply(layer, 4, "all-linear")
    assert sorted(name for name, _ in minipissa.pissa_layers(layer)) == ["linear1", "linear2"]
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_all_linear_leaves_the_output_head_of_a_sequential_and_named_heads():
    model = minipissa.apply(stack(), 4, "all-linear")
    assert sorted(name for name, _ in minipissa.pissa_layers(model)) == ["0", "2"]
    torch.manual_seed(0)
    tower = nn.ModuleDict({"body": nn.Linear(8, 8), "classifier": nn.Linear(8, 2), "score": nn.Linear(8, 1)})
    assert [name for name, _ in minipissa.pissa_layers(minipissa.apply(tower, 2, "all-linear"))] == ["body"]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 12)
        self.b = self.a  # one module under two names
        self.c = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.tanh(self.a(x))))


def test_a_module_under_two_names_is_replaced_under_both_and_reloads(tmp_path):
    model = Shared()
    x = torch.randn(3, 12)
    y = model(x)
    minipissa.apply(model, 4, ["a", "c"])
    assert model.a is model.b and isinstance(model.b, minipissa.PiSSALinear)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.a.A.add_(0.1)
    minipissa.save(model, tmp_path / "a.safetensors")
    loaded = minipissa.load(Shared(), tmp_path / "a.safetensors")
    assert loaded.a is loaded.b and torch.equal(loaded(x), model(x))


def test_tied_weights_are_refused_with_what_to_do():
    torch.manual_seed(0)
    model = nn.ModuleDict({"p": nn.Linear(8, 8), "q": nn.Linear(8, 8)})
    model["q"].weight = model["p"].weight
    before = snapshot(model)
    with pytest.raises(ValueError, match="'p' shares its weight with 'q' .*untie"):
        minipissa.apply(model, 2, "p")
    assert_unchanged(model, before)


def test_gpt2_tied_lm_head_targeted_explicitly_is_refused():
    pytest.importorskip("transformers")
    from models import tiny_gpt2

    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'transformer.wte'"):
        minipissa.apply(model, 4, ["c_attn", "lm_head"])
    assert_unchanged(model, before)


def test_hugging_face_save_pretrained_recipe_unload_first(tmp_path):
    """save_pretrained on an adapted model would write the residual (its A/B/A0/B0 dropped as unexpected keys);
    the documented way: unload() (the fine-tuned model in plain classes), then save_pretrained. Or keep the
    adapter file and load it onto the pretrained base (minipissa.save / minipissa.load)."""
    pytest.importorskip("transformers")
    from models import tiny_llama
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = minipissa.apply(tiny_llama(), 4, ["q_proj", "v_proj"])
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(0.05 * torch.randn_like(layer.A))
    expected = model(ids).logits
    minipissa.save(model, tmp_path / "adapter.safetensors")
    minipissa.unload(model)
    model.save_pretrained(tmp_path / "tuned")
    tuned = LlamaForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    torch.testing.assert_close(tuned(ids).logits, expected, rtol=1e-4, atol=1e-4)  # one rounding of W + s B A
    pretrained = minipissa.load(
        LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter.safetensors"
    )
    assert torch.equal(pretrained(ids).logits, expected)
