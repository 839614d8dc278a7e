"""Several named adapters on one model (minipissa/adapters.py): each exactly the model it was trained as.

The property: adapters trained alone on copies of one base and saved, loaded together in any order, compute what
each computes alone (bit for bit where it shares the resident adapter's initialisation, else within a rounding
bound derived in tests/bounds.py); a mixed batch is each group of examples run with its adapter; original() is the
base; deleting an adapter leaves the others bit for bit as they were.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import bounds
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import Conv1D, train_steps
from torch import Tensor, nn

import minipissa
from minipissa.nn.layer import PiSSALinear


class Chain(nn.Module):
    """Linear or Conv1D layers with tanh between them."""

    def __init__(self, sizes: tuple[int, ...], conv1d: bool, dtype: torch.dtype) -> None:
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if conv1d else (lambda i, o: nn.Linear(i, o))
        self.layers = nn.ModuleList(make(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True))
        self.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(torch.tanh(x) if i else x)
        return x


@dataclass(frozen=True)
class Spec:
    rank: int
    alpha: float | None
    rslora: bool
    niter: int | None
    seed: int
    steps: int

    def options(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "niter": self.niter, "seed": self.seed}

    def initialisation(self) -> tuple[object, ...]:
        """What the initial factors depend on (the seed only for the randomized SVD); the scaling, not alpha."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        scaling = alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        return (self.rank, scaling, self.niter, self.seed if self.niter is not None else None)


specs = st.builds(
    Spec,
    rank=st.integers(1, 4),
    alpha=st.sampled_from([None, 2.0, 8.0]),
    rslora=st.booleans(),
    niter=st.sampled_from([None, 2]),
    seed=st.integers(0, 1),
    steps=st.integers(1, 3),
)


def alone(base: nn.Module, spec: Spec, x: Tensor) -> nn.Module:
    """A copy of ``base`` with one adapter of ``spec``, trained ``spec.steps`` AdamW steps."""
    model = copy.deepcopy(base)
    minipissa.apply(model, targets="all-linear", **spec.options())  # type: ignore[arg-type]
    train_steps(model, x, spec.steps, lr=3e-2)
    return model


def pissa(model: nn.Module) -> list[PiSSALinear]:
    return [m for m in model.modules() if isinstance(m, PiSSALinear)]


def inputs_of(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Each PiSSA layer's input (batch, in) in a forward of ``model`` on x."""
    seen: list[Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach())) for layer in pissa(model)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def bound(single: nn.Module, shared: nn.Module, x: Tensor) -> Tensor:
    """|shared(x) - single(x)| elementwise, for the active adapter of ``shared`` computed as W_res0 + C·D (another
    adapter's residual, corrected) + s·B·A, and ``single`` the model with that adapter alone (W_res_j + s·B·A).

    Per layer: W_res0 + C·D - W_res_j = d0 - dj + e, the roundings of the two residuals (|d| <= u·|W_res|) and of
    C, D to the residual's dtype (|e| <= 2u·|C|·|D|); every product and sum of the two forwards rounds by at most
    gamma_n of the sum of |terms| (n = in + k + r + 3 terms, bias and the three partial sums included)."""
    u = bounds.unit(x.dtype)
    steps = []
    for one, two in zip(pissa(single), pissa(shared), strict=True):
        w_j, w_0 = bounds.stored(one), bounds.stored(two)
        lr = bounds.low_rank(one.B, one.A, one.scaling)
        c, d = two.correction_b, two.correction_a
        cd = torch.zeros_like(w_0) if c is None else bounds.low_rank(c, d, 1.0)
        k = 0 if c is None else c.shape[1]
        g = bounds.gamma(one.in_features + k + one.rank + 3, u)
        rounding = u * (w_0 + w_j) + 2 * u * cd + g * (w_j + w_0 + cd + 2 * lr)
        bias = torch.zeros(one.out_features) if one.bias is None else bounds.absolute(one.bias)
        steps.append((w_j + lr, rounding, 2 * g * bias))
    return bounds.chain(steps, inputs_of(single, x), u)


@st.composite
def setups(draw: st.DrawFn) -> tuple[bool, tuple[int, ...], torch.dtype, list[Spec], list[int]]:
    conv1d = draw(st.booleans())
    sizes = tuple(draw(st.lists(st.integers(5, 9), min_size=3, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    first = draw(specs)
    # Some adapters share the first one's initialisation (trained otherwise), the others are drawn freely.
    rest = [draw(st.one_of(st.just(first), specs)) for _ in range(draw(st.integers(1, 3)))]
    chosen = [first, *(Spec(**{**s.__dict__, "steps": draw(st.integers(1, 3))}) for s in rest)]
    order = draw(st.permutations(range(len(chosen))))
    return conv1d, sizes, dtype, chosen, list(order)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=setups(), data=st.data())
def test_each_adapter_computes_its_model_alone(setup, data, tmp_path: Path) -> None:
    conv1d, sizes, dtype, chosen, order = setup
    torch.manual_seed(len(chosen))
    base = Chain(sizes, conv1d, dtype)
    x = torch.randn(5, sizes[0], dtype=dtype)
    singles = {f"a{j}": alone(base, spec, x) for j, spec in enumerate(chosen)}
    for name, model in singles.items():
        minipissa.save(model, tmp_path / f"{name}.safetensors")
    shared = copy.deepcopy(base)
    for j in order:
        minipissa.load(shared, tmp_path / f"a{j}.safetensors", name=f"a{j}")
    assert list(minipissa.adapters(shared)) == [f"a{j}" for j in order]
    resident = chosen[order[0]].initialisation()
    outputs = {}
    with torch.no_grad():
        for j, spec in enumerate(chosen):
            name = f"a{j}"
            minipissa.set_adapter(shared, name)
            outputs[name] = got = shared(x)
            want = singles[name](x)
            if spec.initialisation() == resident:  # the resident residual is its own: nothing corrected
                assert minipissa.adapters(shared)[name]["exact"]
                assert torch.equal(got, want), name
            else:
                assert bool(((got - want).abs() <= bound(singles[name], shared, x)).all()), name
        _check_mixed(shared, x, data.draw(st.lists(st.sampled_from([*singles, None]), min_size=5, max_size=5)))
        with minipissa.original(shared), minipissa.original(singles[f"a{order[0]}"]):
            assert torch.equal(shared(x), singles[f"a{order[0]}"](x))
        gone = data.draw(st.sampled_from(sorted(singles)))
        minipissa.set_adapter(shared, next(n for n in singles if n != gone))
        minipissa.delete_adapter(shared, gone)
        assert sorted(minipissa.adapters(shared)) == sorted(set(singles) - {gone})
        for name in minipissa.adapters(shared):
            with minipissa.adapter(shared, name):
                assert torch.equal(shared(x), outputs[name]), name


def _check_mixed(model: nn.Module, x: Tensor, names: list[str | None]) -> None:
    """Each group of examples of a mixed batch gets what the model with its adapter (None: original()) gives it."""
    with minipissa.per_example(model, names):
        mixed = model(x)
    for name in set(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name is None:
            with minipissa.original(model):
                want = model(x[rows])
        else:
            with minipissa.adapter(model, name):
                want = model(x[rows])
        assert torch.equal(mixed[rows], want), name


def test_original_is_the_base_within_the_residuals_rounding(tmp_path: Path) -> None:
    """original() computes W_res0 + s0·B0·A0: the base W up to W_res0's rounding (u·|W_res0|) and the products'."""
    torch.manual_seed(0)
    base = Chain((8, 7, 6), conv1d=False, dtype=torch.float32)
    x = torch.randn(4, 8)
    for j, rank in enumerate((2, 3)):
        minipissa.save(alone(base, Spec(rank, None, False, None, 0, 2), x), tmp_path / f"{j}.safetensors")
    shared = copy.deepcopy(base)
    minipissa.load(shared, tmp_path / "0.safetensors", name="two")
    minipissa.load(shared, tmp_path / "1.safetensors", name="three")
    u = bounds.unit(torch.float32)
    steps = []
    for layer in pissa(shared):
        w, p = bounds.stored(layer), bounds.low_rank(layer.B0, layer.A0, layer.scaling)
        g = bounds.gamma(layer.in_features + layer.rank + 3, u)
        steps.append((w + p, u * w + g * (2 * w + 2 * p), 2 * g * bounds.absolute(layer.bias)))
    with torch.no_grad():
        want = base(x)
        for name in ("two", "three"):
            with minipissa.adapter(shared, name), minipissa.original(shared):
                got = shared(x)
            assert bool(((got - want).abs() <= bounds.chain(steps, inputs_of(shared, x), u)).all())


def test_training_one_adapter_leaves_the_others(tmp_path: Path) -> None:
    """Only the active adapter's A and B require grad; training it changes no other adapter's outputs."""
    torch.manual_seed(1)
    base = Chain((8, 7, 6), conv1d=True, dtype=torch.float32)
    x = torch.randn(4, 8)
    model = copy.deepcopy(base)
    minipissa.apply(model, targets="all-linear", rank=2, name="p")
    minipissa.apply(model, targets="all-linear", rank=3, name="q")
    assert minipissa.active_adapter(model) == "p"
    with torch.no_grad(), minipissa.adapter(model, "q"):
        before = model(x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{k}" for i in range(2) for k in "AB"}
    train_steps(model, x, 2)
    with torch.no_grad(), minipissa.adapter(model, "q"):
        assert torch.equal(model(x), before)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
