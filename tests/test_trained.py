"""Modules trained in full beside the adapters (train_modules, PEFT's modules_to_save): they train, save, load
(checked first), export to PEFT, and bad input is refused with the model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import MLP
from snapshots import assert_refused, assert_unchanged, editable, snapshot

import minipissa
from minipissa import StateError, safefile


def base(head: int = 4) -> MLP:
    torch.manual_seed(0)
    return MLP((32, 48, 24, head))


def trained_model() -> tuple[MLP, torch.optim.Optimizer]:
    model = minipissa.apply(base(), 4, ["layers.0", "layers.1"], train_modules=["layers.2"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_a_head_trained_in_full_saves_loads_and_exports(tmp_path: Path) -> None:
    model, opt = trained_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layers.0.A", "layers.0.B", "layers.1.A", "layers.1.B", "layers.2.weight", "layers.2.bias"}
    assert not torch.equal(model.layers[2].weight, base().layers[2].weight)  # the head really trained
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    x = torch.randn(5, 32)
    loaded = minipissa.load(base(), tmp_path / "a.safetensors")
    assert torch.equal(loaded(x), model(x))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    resumed = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    minipissa.load(loaded, tmp_path / "a.safetensors", optimizer=resumed)
    assert len(resumed.state) == 6  # A, B of two layers and the head's weight and bias

    peft = pytest.importorskip("peft")
    report = minipissa.convert_to_lora(tmp_path / "a.safetensors", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["layers.2"] == report.modules_to_save
    served = peft.PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    with torch.no_grad():
        ours, theirs = model(x), served(x)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()  # as in test_convert's PEFT comparisons
    assert (ours - base()(x)).abs().max() > 1e-2 * ours.abs().max()
    assert "modules_to_save" in (tmp_path / "lora" / "README.md").read_text()


def test_bad_train_modules_and_files_are_refused_and_change_nothing(tmp_path: Path) -> None:
    for kwargs, match in [
        ({"train_modules": ["nothing"]}, "matches no module"),
        ({"train_modules": ["layers"]}, "both trained in full .* and adapted"),
        ({"train_modules": ["layers.0"]}, "both trained in full"),
        ({"train_modules": 3}, "train_modules"),
    ]:
        model = base()
        before = snapshot(model)
        with pytest.raises((ValueError, TypeError), match=match):
            minipissa.apply(model, 4, ["layers.0", "layers.1"], **kwargs)
        assert_unchanged(model, before)

    model, _ = trained_model()
    minipissa.save(model, tmp_path / "a.safetensors")
    other = base(head=5)  # another head size
    before = snapshot(other)
    with pytest.raises(StateError, match="'layers.2' \\(trained in full\\) has parameters"):
        minipissa.load(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)

    payload, tensors = editable(tmp_path / "a.safetensors")
    for change, match in [
        (lambda p, t: t.update({"trained:layers.2.weight": torch.full_like(t["trained:layers.2.weight"], torch.nan)}),
         "finite floating-point"),
        (lambda p, t: t.pop("trained:layers.2.bias"), "lacks tensors"),
        (lambda p, t: p.update(trained={"layers.2": "weight"}), "must map module names"),
        (lambda p, t: p.update(trained={}), "no module accounts for"),
    ]:  # fmt: skip
        crafted_payload, crafted = json.loads(json.dumps(payload)), dict(tensors)
        change(crafted_payload, crafted)
        safefile.write(tmp_path / "c.safetensors", crafted, "adapter", crafted_payload)
        assert_refused(base(), lambda m: minipissa.load(m, tmp_path / "c.safetensors"), match)


def test_a_module_trained_in_full_then_deleted_is_named_not_an_attribute_error(tmp_path: Path) -> None:
    """`del model.head` after apply(train_modules=[...]): save and convert say which module is gone (they used to
    raise AttributeError) and write nothing."""
    model, _ = trained_model()
    del model.layers[2]  # an MLP's head: layers.2
    for call in (
        lambda m: minipissa.save(m, tmp_path / "a.safetensors"),
        lambda m: minipissa.convert_to_lora(m, tmp_path / "lora"),
    ):
        assert_refused(model, call, r"module 'layers.2' was trained in full \(train_modules\) but is no longer")
    assert not list(tmp_path.iterdir())


def test_a_second_apply_after_a_module_trained_in_full_was_deleted_does_not_stop_midway() -> None:
    torch.manual_seed(0)
    model = minipissa.apply(MLP((32, 48, 24, 4)), 4, "layers.0", train_modules=["layers.2"])
    del model.layers[2]
    minipissa.apply(model, 4, "layers.1")  # freezing and unfreezing skips the module that is gone
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.{k}" for i in (0, 1) for k in ("A", "B")
    }
