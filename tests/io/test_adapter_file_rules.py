"""The rule of minipissa.save / load (state.py): what save() writes, load() reads back exactly (bit-identical
outputs and state), or save() refuses with a named error; and A and B go into an existing layer only if it holds
the residual they were trained on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError


def build(dtype: torch.dtype = torch.float32, conv1d: bool = False, seed: int = 0) -> nn.Module:
    """A body to adapt ("0": Linear or GPT-2 Conv1D, 16 -> 12) and a head to train in full ("2")."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    body = Conv1D(12, 16) if conv1d else nn.Linear(16, 12)
    return nn.Sequential(body, nn.Tanh(), nn.Linear(12, 6)).to(dtype)


def train(model: nn.Module, head: bool) -> None:
    """Move A and B (and the head) as a few steps would: the saved state must differ from the init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(0.05 * torch.randn(layer.A.shape, generator=g).to(layer.A.dtype))
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g).to(layer.B.dtype))
        if head:
            model[2].weight.add_(0.1)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    conv1d=st.booleans(),
    quantize=st.sampled_from([None, "nf4"]),
    niter=st.sampled_from([None, 0, 2]),
    rslora=st.booleans(),
    alpha=st.sampled_from([None, 0.5, 12.0]),
    cast=st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32]),
    merge=st.booleans(),
    head=st.booleans(),
    via_residual=st.booleans(),
)
def test_what_save_writes_load_reads_back_exactly(
    tmp_path_factory, dtype, conv1d, quantize, niter, rslora, alpha, cast, merge, head, via_residual
):  # type: ignore[no-untyped-def]
    """apply() with drawn options, training, a cast after apply (``model.half()``...), merge: save(), then load() onto
    a fresh base cast as the saved one was (or load_residual() + load(base="residual")) gives the same model."""
    merge = merge and quantize is None  # a 4-bit residual refuses to merge
    model = minipissa.apply(
        build(dtype, conv1d), 4, ["0"], alpha=alpha, rslora=rslora, niter=niter, quantize=quantize,
        train_modules=["2"] if head else None,
    )  # fmt: skip
    train(model, head)
    if cast is not None:
        model = model.to(cast)
    if merge:
        minipissa.merge(model)
    folder = tmp_path_factory.mktemp("rule")
    minipissa.save(model, folder / "a.safetensors")
    if via_residual:
        minipissa.save_residual(model, folder / "r.safetensors")
        fresh = build(dtype, conv1d, seed=5).to(cast or dtype)  # other weights: all must come from the files
        loaded = minipissa.load_residual(fresh, folder / "r.safetensors")
        minipissa.load(loaded, folder / "a.safetensors", base="residual")
    else:
        loaded = minipissa.load(build(dtype, conv1d), folder / "a.safetensors")
        loaded = loaded if cast is None else loaded.to(cast)
    if merge:
        minipissa.merge(loaded)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(cast or dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert_same_state(model, loaded)


def test_a_head_saved_after_a_cast_loads_onto_the_uncast_model_exactly(tmp_path: Path) -> None:
    """A float16 head saved after model.half() goes into the float32 model it is loaded onto (each value fits, and the
    cast after loading gives the saved bits); a head whose values another dtype does not hold is refused."""
    model = minipissa.apply(build(), 4, ["0"], train_modules=["2"])
    train(model, head=True)
    minipissa.save(model.half(), tmp_path / "h.safetensors")
    loaded = minipissa.load(build(), tmp_path / "h.safetensors")
    assert loaded[2].weight.dtype == torch.float32 and torch.equal(loaded[2].weight.half(), model[2].weight)

    model = minipissa.apply(build(torch.float16), 4, ["0"], train_modules=["2"])
    model[2].float()  # the head alone trained in float32
    with torch.no_grad():
        model[2].weight[0, 0] = 1e-9  # no float16 holds it
    minipissa.save(model, tmp_path / "f.safetensors")
    half = build(torch.float16)
    before = snapshot(half)
    with pytest.raises(StateError, match=r"module '2' \(trained in full\) has parameters"):
        minipissa.load(half, tmp_path / "f.safetensors")
    assert_unchanged(half, before)
    with torch.no_grad():
        model[2].weight[0, 0] = 0.5
    minipissa.save(model, tmp_path / "f.safetensors")
    assert torch.equal(minipissa.load(half, tmp_path / "f.safetensors")[2].weight, model[2].weight.half())


def _codes_edited(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model[0].weight.codes[0] ^= 1
    return model


@pytest.mark.parametrize(
    ("saved", "existing", "match"),
    [
        (
            lambda: minipissa.apply(build(), 4, ["0"], quantize="nf4"),
            lambda: minipissa.apply(build(), 4, ["0"]),
            "with a full-precision residual; the file's adapter was trained on a 4-bit",
        ),
        (
            lambda: minipissa.apply(build(), 4, ["0"]),
            lambda: minipissa.apply(build(), 4, ["0"], quantize="nf4"),
            r"with a 4-bit \(QPiSSA\) residual; the file's adapter was trained on a full-precision",
        ),
        (  # LoRA's A0 (seeded by the name) and B0 (zero) are the same on any base
            lambda: minipissa.apply(build(seed=0), 4, ["0"], init="lora"),
            lambda: minipissa.apply(build(seed=1), 4, ["0"], init="lora"),
            "made from another base weight",
        ),
        (  # the same weights in another dtype: the same float32 factors
            lambda: minipissa.apply(build(torch.float16), 4, ["0"], init="lora"),
            lambda: minipissa.apply(build(torch.bfloat16), 4, ["0"], init="lora"),
            "made from another base weight",
        ),
        (
            lambda: minipissa.apply(build(), 4, ["0"], quantize="nf4"),
            lambda: _codes_edited(minipissa.apply(build(), 4, ["0"], quantize="nf4")),
            "its 4-bit residual is not the one the file's adapter was trained on",
        ),
    ],
)
def test_a_b_go_only_into_a_layer_holding_the_residual_they_were_trained_on(
    tmp_path: Path, saved: Callable[[], nn.Module], existing: Callable[[], nn.Module], match: str
) -> None:
    """The initial factors alone do not tell: QPiSSA and PiSSA of one weight share them, as LoRA inits do."""
    source, target = saved(), existing()
    assert torch.equal(source[0].A0, target[0].A0) and torch.equal(source[0].B0, target[0].B0)
    train(source, head=False)
    minipissa.save(source, tmp_path / "a.safetensors")
    before = snapshot(target)
    with pytest.raises(StateError, match=match):
        minipissa.load(target, tmp_path / "a.safetensors")
    assert_unchanged(target, before)


def test_a_layer_recorded_on_another_dtype_or_shape_is_refused_whatever_its_digest(tmp_path: Path) -> None:
    """Fingerprints of two format versions (version 1's sampled digest, today's hash) share no digest: the shape
    and dtype are then all that tells two bases apart, so they are compared whatever the digests say."""
    model = minipissa.apply(build(), 4, ["0"])
    minipissa.save(model, tmp_path / "a.safetensors")
    for key, value in (("dtype", "bfloat16"), ("shape", [16, 12])):
        target = minipissa.load(build(), tmp_path / "a.safetensors")
        target[0].info["base_fingerprint"] = {**target[0].info["base_fingerprint"], key: value}
        with pytest.raises(StateError, match="made from another base weight"):
            minipissa.load(target, tmp_path / "a.safetensors")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loading_again_onto_the_loaded_layers_sets_a_and_b(tmp_path: Path, quantize: str | None) -> None:
    """The resume flow (load, create the optimizer, load again with it) passes those checks."""
    model = minipissa.apply(build(), 4, ["0"], quantize=quantize)
    train(model, head=False)
    minipissa.save(model, tmp_path / "a.safetensors")
    loaded = minipissa.load(build(), tmp_path / "a.safetensors")
    with torch.no_grad():
        loaded[0].A.zero_()
    minipissa.load(loaded, tmp_path / "a.safetensors")
    assert_same_state(model, loaded)


def _nan_in_a(layer: minipissa.PiSSALinear) -> None:
    with torch.no_grad():
        layer.A[0, 0] = float("nan")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_nan_in_a, "module '0' A, B, A0, B0 must be finite"),  # training diverged
        (lambda layer: layer.info.__setitem__("seed", 2**64), "module '0' seed must be an int in"),
        (lambda layer: layer.info.__setitem__("singular_values", [1.0]), "singular_values must be 4 values"),
        (lambda layer: layer.info.__setitem__("seed", object()), "the metadata is not JSON-able"),
    ],
)
def test_save_refuses_what_load_would_refuse(
    tmp_path: Path, edit: Callable[[minipissa.PiSSALinear], None], match: str
) -> None:
    model = minipissa.apply(build(), 4, ["0"])
    edit(model[0])
    with pytest.raises(StateError, match=f"minipissa.save: .*{match}"):
        minipissa.save(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_residual_cast_to_float64_says_how_to_reload(tmp_path: Path) -> None:
    """A float64 residual takes float64 factors, the file's are float32: the original base, then the cast, does it."""
    model = minipissa.apply(build(), 4, ["0"]).double()
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    residual = minipissa.load_residual(build().double(), tmp_path / "r.safetensors")
    before = snapshot(residual)
    with pytest.raises(StateError, match=r"load onto the original float32 weights \(base='original'\) and cast"):
        minipissa.load(residual, tmp_path / "a.safetensors", base="residual")
    assert_unchanged(residual, before)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(minipissa.load(build(), tmp_path / "a.safetensors").double()(x), model(x))
