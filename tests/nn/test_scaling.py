"""The scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA) through every path, against float64 arithmetic written
here from the formulas, not taken from the code under test: fused and reference forward and backward, merge,
original(), disabled(), save/load and conversion to LoRA. And each option changes what it should."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import Conv1D
from safetensors.torch import load_file
from torch import nn

import minipissa
from minipissa.nn.layer import PiSSALinear


def expected_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounding bound of x @ weight^T + bias computed in ``dtype``: each output sums k = in terms and the bias, so
    |error| <= (k + 4) u sum |terms|."""
    return (x.shape[-1] + 4) * torch.finfo(dtype).eps * (x.abs() @ weight.abs().mT + bias.abs())


class Net(nn.Module):
    def __init__(self, n_in: int, n_out: int, conv1d: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = (Conv1D(n_out, n_in) if conv1d else nn.Linear(n_in, n_out)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


CASES = dict(
    n_in=st.integers(3, 12),
    n_out=st.integers(3, 12),
    rank=st.integers(1, 3),
    alpha=st.sampled_from([0.5, 1.0, 3.0, 8.0, 64.0]),
    rslora=st.booleans(),
    conv1d=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)


def adapted(n_in, n_out, rank, alpha, rslora, conv1d, dtype, seed) -> tuple[nn.Module, nn.Module, float]:
    torch.manual_seed(seed)
    base = Net(n_in, n_out, conv1d, dtype)
    model = minipissa.apply(copy.deepcopy(base), rank, "proj", alpha=alpha, rslora=rslora)
    layer = model.proj
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # as training would: A and B leave A0 and B0
        layer.A.add_(0.3 * torch.randn(layer.A.shape, generator=g, dtype=layer.A.dtype))
        layer.B.add_(0.3 * torch.randn(layer.B.shape, generator=g, dtype=layer.B.dtype))
    return base, model, expected_scaling(alpha, rank, rslora)


def weights(base: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """W, b, W_res, A, B, A0, B0 in float64, W as (out, in)."""
    layer, flip = model.proj, isinstance(base.proj, Conv1D)
    w = base.proj.weight.detach().double()
    res = layer.weight.detach().double()
    return {
        "W": w.mT if flip else w,
        "b": base.proj.bias.detach().double(),
        "W_res": res.mT if flip else res,
        **{k: getattr(layer, k).detach().double() for k in ("A", "B", "A0", "B0")},
    }


@given(**CASES)
@example(n_in=8, n_out=5, rank=3, alpha=64.0, rslora=True, conv1d=True, dtype=torch.float32, seed=1)
def test_forward_backward_merge_and_modes_use_the_scaling(n_in, n_out, rank, alpha, rslora, conv1d, dtype, seed):
    base, model, s = adapted(n_in, n_out, rank, alpha, rslora, conv1d, dtype, seed)
    layer, t = model.proj, weights(base, model)
    assert layer.scaling == pytest.approx(s, rel=1e-15)
    x = torch.randn(4, n_in, dtype=dtype, generator=torch.Generator().manual_seed(seed + 2))
    xd = x.double()
    # The residual: W - s B0 A0, one rounding to the weight's dtype.
    delta0 = s * t["B0"] @ t["A0"]
    assert torch.allclose(t["W_res"], t["W"] - delta0, rtol=0, atol=4 * torch.finfo(dtype).eps * t["W"].abs().max())

    h = xd @ t["A"].mT
    expected = xd @ t["W_res"].mT + t["b"] + s * h @ t["B"].mT
    # Rounding: the base product (n_in terms), x A^T (n_in) and h B^T (r), each within (k + 4) u of its magnitude.
    u, xa = torch.finfo(dtype).eps, xd.abs()
    tol = (
        (n_in + rank + 8) * u * (xa @ t["W_res"].abs().mT + t["b"].abs() + s * (xa @ t["A"].abs().mT) @ t["B"].abs().mT)
    )
    g = torch.randn(4, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 3))
    # dA = s B^T g^T x, dB = s g^T (x A^T): the scaling carried into both.
    d_a, d_b = s * (g @ t["B"]).mT @ xd, s * g.mT @ h
    for path in ("fast", "reference"):
        layer.A.grad = layer.B.grad = None
        with pytest.MonkeyPatch.context() as patch:
            if path == "reference":  # the plain formula, as under autocast or in another mode
                patch.setattr(PiSSALinear, "_fast_path_applies", lambda self, x: False)
            y = model(x)
        assert (y.double() - expected).abs().le(tol).all(), path
        y.backward(g.to(dtype))
        grad_tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(layer.A.grad.double(), d_a, rtol=grad_tol, atol=grad_tol * d_a.abs().max())
        torch.testing.assert_close(layer.B.grad.double(), d_b, rtol=grad_tol, atol=grad_tol * d_b.abs().max())

    with minipissa.original(model):  # W_res + s B0 A0 = W: the model before PiSSA
        want = xd @ t["W"].mT + t["b"]
        assert (model(x).double() - want).abs().le(bound(xd, t["W"].abs() + 2 * delta0.abs(), t["b"], dtype)).all()
    with minipissa.disabled(model):
        want = xd @ t["W_res"].mT + t["b"]
        assert (model(x).double() - want).abs().le(bound(xd, t["W_res"], t["b"], dtype)).all()
    minipissa.merge(model)
    merged = t["W_res"] + s * t["B"] @ t["A"]
    got = layer.weight.detach().double()
    got = got.mT if conv1d else got
    assert torch.allclose(got, merged, rtol=0, atol=8 * torch.finfo(dtype).eps * merged.abs().max())
    minipissa.unmerge(model)


@given(**CASES)
@example(n_in=8, n_out=5, rank=3, alpha=64.0, rslora=True, conv1d=False, dtype=torch.float32, seed=1)
def test_save_load_and_conversion_to_lora_keep_the_scaling(
    tmp_path_factory, n_in, n_out, rank, alpha, rslora, conv1d, dtype, seed
):
    base, model, s = adapted(n_in, n_out, rank, alpha, rslora, conv1d, dtype, seed)
    tmp = tmp_path_factory.mktemp("scaling")
    x = torch.randn(4, n_in, dtype=dtype, generator=torch.Generator().manual_seed(seed + 2))
    minipissa.save(model, tmp / "a.safetensors")
    loaded = minipissa.load(copy.deepcopy(base), tmp / "a.safetensors")
    assert loaded.proj.scaling == model.proj.scaling and torch.equal(loaded(x), model(x))

    minipissa.convert_to_lora(tmp / "a.safetensors", tmp / "lora", prefix="")
    config = json.loads(Path(tmp / "lora" / "adapter_config.json").read_text())
    lora = load_file(str(tmp / "lora" / "adapter_model.safetensors"))
    a, b = lora["proj.lora_A.weight"].double(), lora["proj.lora_B.weight"].double()
    r2 = config["rank_pattern"].get("proj", config["r"])
    alpha2 = config["alpha_pattern"].get("proj", config["lora_alpha"])
    s2 = expected_scaling(alpha2, r2, config["use_rslora"])  # PEFT's arithmetic on the ORIGINAL weight
    t = weights(base, model)
    y = x.double() @ t["W"].mT + t["b"] + s2 * (x.double() @ a.mT) @ b.mT
    want = x.double() @ t["W_res"].mT + t["b"] + s * (x.double() @ t["A"].mT) @ t["B"].mT
    scale = x.double().abs() @ (t["W"].abs() + s * t["B"].abs() @ t["A"].abs() + s * t["B0"].abs() @ t["A0"].abs()).mT
    assert (y - want).abs().le(64 * torch.finfo(dtype).eps * (scale + t["b"].abs())).all()


def test_each_option_changes_what_it_should_and_nothing_else():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 32))

    def factors(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor, float]:
        layer = minipissa.apply(copy.deepcopy(base), 4, "0", **kwargs)[0]  # type: ignore[arg-type]
        return layer.A0.double(), layer.B0.double(), layer.scaling

    a1, b1, s1 = factors()
    for kwargs in ({"alpha": 16.0}, {"alpha": 3.0, "rslora": True}):
        a2, b2, s2 = factors(**kwargs)
        assert s2 != s1
        # alpha moves only the magnitude of A and B (sqrt(S / s)); the product s B A is the principal part.
        torch.testing.assert_close(a2, a1 * math.sqrt(s1 / s2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s2 * b2 @ a2, s1 * b1 @ a1, rtol=1e-5, atol=1e-6)
    randomized = {"niter": 1, "oversample": 0}
    ra, _, _ = factors(**randomized)
    for change in ({"oversample": 24}, {"niter": 4}, {"seed": 1}):
        other, _, _ = factors(**(randomized | change))
        assert not torch.allclose(other, ra, atol=1e-4), change  # the option reached the decomposition
    minor, _, _ = factors(components="minor")
    assert not torch.allclose(minor.abs(), a1.abs(), atol=1e-3)
    lora_a, lora_b, _ = factors(init="lora")
    assert lora_b.abs().sum() == 0 and lora_a.abs().sum() > 0
    model = minipissa.apply(copy.deepcopy(base), 4, "0", dropout=0.5)
    x = torch.randn(8, 40)
    with torch.no_grad():
        model[0].B.add_(1.0)  # so that the adapter's input matters
    assert not torch.equal(model.train()(x), model.train()(x))  # dropout on the adapter's input in training
    assert torch.equal(model.eval()(x), model.eval()(x))
