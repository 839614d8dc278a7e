"""Several adapters on one model: the PiSSA-vs-converted-LoRA workflow, apply(name=), and what is refused (by
name, before the model changes)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import MLP, tiny_gpt2, train_steps
from torch import Tensor, nn

import minipissa
from minipissa import StateError


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_pissa_and_its_converted_lora_side_by_side_then_training_on(tmp_path: Path) -> None:
    """Train PiSSA, convert to LoRA, load the LoRA beside it: both agree; training PiSSA on leaves the LoRA as it
    was, and the PiSSA adapter saved (with its optimizer) resumes on a fresh base exactly."""
    model = tiny_gpt2()  # Conv1D layers
    ids = torch.randint(0, 128, (2, 10))

    def loss_of(m: nn.Module) -> Tensor:
        return m(ids).logits.square().mean()

    minipissa.apply(model, targets="all-linear", rank=4, name="pissa")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    minipissa.convert_to_lora(model, tmp_path / "lora")
    minipissa.load_lora(model, tmp_path / "lora", name="lora")
    assert list(minipissa.adapters(model)) == ["pissa", "lora"]
    assert minipissa.active_adapter(model) == "pissa"
    with torch.no_grad():
        pissa = model(ids).logits
        with minipissa.adapter(model, "lora"):
            lora = model(ids).logits
    # Both are W + ΔW to float32 rounding of 64-term products through 2 layers: far below the logits' scale.
    torch.testing.assert_close(lora, pissa, rtol=0, atol=1e-4 * float(pissa.abs().max()))
    loss_of(model).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, pissa)
        with minipissa.adapter(model, "lora"):
            assert torch.equal(model(ids).logits, lora)
    minipissa.save(model, tmp_path / "pissa.safetensors", optimizer=opt)
    fresh = tiny_gpt2()
    minipissa.load(fresh, tmp_path / "pissa.safetensors")
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    minipissa.load(fresh, tmp_path / "pissa.safetensors", optimizer=opt2)
    for m, o in ((model, opt), (fresh, opt2)):
        loss_of(m).backward()
        o.step()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_apply_with_a_name_adds_an_adapter_as_apply_on_the_base_makes_it() -> None:
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(3, 32)
    model = copy.deepcopy(base)
    minipissa.apply(model, targets="all-linear", rank=4, name="one")
    train_steps(model, x, 2)
    minipissa.apply(model, targets="all-linear", rank=4, name="same")  # the resident init: its factors reused
    minipissa.apply(model, targets="all-linear", rank=2, alpha=4.0, name="other")  # decomposed from W_res0 + s0·B0·A0
    listed = minipissa.adapters(model)
    assert [listed[n]["exact"] for n in listed] == [True, True, False]
    assert (listed["other"]["rank"], listed["other"]["alpha"], listed["one"]["active"]) == (2, 4.0, True)
    for name, options in (("same", {"rank": 4}), ("other", {"rank": 2, "alpha": 4.0})):
        alone = copy.deepcopy(base)
        minipissa.apply(alone, targets="all-linear", **options)  # type: ignore[arg-type]
        with torch.no_grad(), minipissa.adapter(model, name):
            if name == "same":
                assert torch.equal(model(x), alone(x))
            else:  # W up to W_res0's rounding: a few float32 ulps of outputs of size ~1
                torch.testing.assert_close(model(x), alone(x), rtol=0, atol=1e-5)
    assert "adapters: one (active), same, other" in str(minipissa.summary(model))


def test_save_and_convert_pick_an_adapter_by_name(tmp_path: Path) -> None:
    torch.manual_seed(2)
    base, x = MLP(), torch.randn(3, 32)
    model = copy.deepcopy(base)
    minipissa.apply(model, targets="all-linear", rank=4, name="a")
    minipissa.apply(model, targets="all-linear", rank=3, name="b")
    with minipissa.adapter(model, "b"):
        train_steps(model, x, 2)
        with torch.no_grad():
            want = model(x)
    minipissa.save(model, tmp_path / "b.safetensors", name="b")
    minipissa.convert_to_lora(model, tmp_path / "b_lora", name="b")
    assert minipissa.active_adapter(model) == "a"
    alone = copy.deepcopy(base)
    minipissa.load(alone, tmp_path / "b.safetensors")
    lora = copy.deepcopy(base)
    minipissa.load_lora(lora, tmp_path / "b_lora")
    with torch.no_grad():
        torch.testing.assert_close(alone(x), want, rtol=0, atol=1e-5)  # b was corrected in `model`; alone it is not
        torch.testing.assert_close(lora(x), want, rtol=0, atol=1e-5)


def test_merge_and_unmerge_the_active_adapter() -> None:
    torch.manual_seed(3)
    model, x = MLP(), torch.randn(3, 32)
    minipissa.apply(model, targets="all-linear", rank=4, name="a")
    minipissa.apply(model, targets="all-linear", rank=2, name="b")
    minipissa.set_adapter(model, "b")
    with torch.no_grad():
        before = model(x)
        minipissa.merge(model)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        with pytest.raises(StateError, match="merged"):
            minipissa.set_adapter(model, "a")
        minipissa.unmerge(model)
        assert torch.equal(model(x), before)


def _two(tmp_path: Path) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(4)
    model = MLP()
    minipissa.apply(model, targets="all-linear", rank=4, name="a")
    minipissa.apply(model, targets="all-linear", rank=2, name="b")
    return model, torch.randn(3, 32)


def test_an_adapter_of_another_base_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    model, _ = _two(tmp_path)
    torch.manual_seed(9)
    other = MLP()
    minipissa.apply(other, targets="all-linear", rank=4)
    minipissa.save(other, tmp_path / "other.safetensors")
    before = state(model)
    with pytest.raises(StateError, match="another base weight"):
        minipissa.load(model, tmp_path / "other.safetensors", name="c")
    assert same_state(model, before) and list(minipissa.adapters(model)) == ["a", "b"]


def test_a_4bit_residual_takes_only_its_own_initialisation(tmp_path: Path) -> None:
    torch.manual_seed(5)
    base, x = MLP(), torch.randn(3, 32)
    model = copy.deepcopy(base)
    minipissa.apply(model, targets="all-linear", rank=4, quantize="nf4", name="q1")
    minipissa.apply(model, targets="all-linear", rank=4, quantize="nf4", name="q2")  # shares the codes: exact
    alone = copy.deepcopy(base)
    minipissa.apply(alone, targets="all-linear", rank=4, quantize="nf4")
    with torch.no_grad(), minipissa.adapter(model, "q2"):
        assert torch.equal(model(x), alone(x))
    before = state(model)
    with pytest.raises(StateError, match="4-bit"):
        minipissa.apply(model, targets="all-linear", rank=2, quantize="nf4", name="q3")
    with pytest.raises(StateError, match="4-bit"):
        minipissa.apply(model, targets="all-linear", rank=4, name="dense")
    dense = copy.deepcopy(base)
    minipissa.apply(dense, targets="all-linear", rank=4)
    minipissa.save(dense, tmp_path / "dense.safetensors")
    with pytest.raises(StateError, match="4-bit"):
        minipissa.load(model, tmp_path / "dense.safetensors", name="dense")
    assert same_state(model, before) and list(minipissa.adapters(model)) == ["q1", "q2"]


@pytest.mark.parametrize(
    ("act", "match"),
    [
        (lambda m, p: minipissa.set_adapter(m, "nope"), "no adapter named 'nope'"),
        (lambda m, p: minipissa.delete_adapter(m, "a"), "active adapter"),
        (lambda m, p: minipissa.apply(m, targets="all-linear", rank=2, name="b"), "adapter named 'b'"),
        (lambda m, p: minipissa.apply(m, targets="all-linear", rank=2, name="x.y"), "without '.'"),
        (lambda m, p: minipissa.per_example(m, "a").__enter__(), "non-empty list"),
        (lambda m, p: minipissa.convert_to_lora(p, p.parent / "out", name="a"), "a file holds one"),
    ],
)
def test_refusals_are_named_and_change_nothing(tmp_path: Path, act, match) -> None:
    model, _ = _two(tmp_path)
    minipissa.save(model, tmp_path / "a.safetensors")
    before = state(model)
    with pytest.raises((StateError, ValueError), match=match):
        act(model, tmp_path / "a.safetensors")
    assert same_state(model, before) and minipissa.active_adapter(model) == "a"


def test_mixed_batches_are_for_inference_and_the_optimizer_belongs_to_one_adapter(tmp_path: Path) -> None:
    model, x = _two(tmp_path)
    model.train()
    with minipissa.per_example(model, ["a", "b", None]), pytest.raises(RuntimeError, match="inference"):
        model(x)
    with minipissa.per_example(model, ["a", "b"]), torch.no_grad(), pytest.raises(ValueError, match="batch of 3"):
        model(x)
    opt_a = train_steps(model, x, 1)
    with minipissa.adapter(model, "b"), pytest.raises(StateError, match="adapter 'a'"):
        minipissa.save(model, tmp_path / "b.safetensors", optimizer=opt_a)
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt_a, name="a")
