"""The biases of adapted layers are part of the base (fingerprinted at apply, checked at load) and of the trained
state (a bias unfrozen or changed after apply is saved, restored bit for bit, trains on, exports to PEFT); what a
file cannot carry is refused at save, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import train_steps
from snapshots import assert_refused, editable
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.io import safefile
from minipissa.io.safefile import write

TARGETS = ["0", "2"]


def base(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8, bias=bias)).to(dtype)


def bias_trained(steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Adapters on both layers, and the bias of layer '2' unfrozen and trained with them (BitFit beside PiSSA)."""
    model = minipissa.apply(base(), 4, TARGETS)
    model[2].bias.requires_grad_(True)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    return model, train_steps(model, x, steps)


def test_a_trained_bias_is_saved_restored_bit_exactly_trains_on_and_resumes(tmp_path: Path) -> None:
    model, opt = bias_trained()
    assert not torch.equal(model[2].bias, base()[2].bias)  # the bias really trained
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    _, tensors = safefile.read(tmp_path / "a.safetensors")
    assert "2.bias" in tensors and "0.bias" not in tensors  # only the trained one
    x = torch.randn(5, 16)
    loaded = minipissa.load(base(), tmp_path / "a.safetensors")
    assert torch.equal(loaded(x), model(x)) and torch.equal(loaded[2].bias, model[2].bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    resumed = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    minipissa.load(loaded, tmp_path / "a.safetensors", optimizer=resumed)
    assert len(resumed.state) == 5  # A, B of two layers and the bias
    y = torch.randn(4, 16)
    for net, optimizer in ((model, opt), (loaded, resumed)):
        net(y).square().mean().backward()
        optimizer.step()
    assert torch.equal(loaded[2].bias, model[2].bias) and torch.equal(loaded[2].A, model[2].A)


def test_a_bias_changed_in_place_while_frozen_is_saved_too(tmp_path: Path) -> None:
    model = minipissa.apply(base(), 4, TARGETS)
    with torch.no_grad():
        model[0].bias[3] += 0.5
    minipissa.save(model, tmp_path / "a.safetensors")
    x = torch.randn(5, 16)
    assert torch.equal(minipissa.load(base(), tmp_path / "a.safetensors")(x), model(x))


def test_biases_are_fingerprinted_at_apply_and_an_untrained_one_is_not_written(tmp_path: Path) -> None:
    model = minipissa.apply(base(bias=False), 4, TARGETS)
    assert model[0].info["bias_fingerprint"]["shape"] == [24] and model[2].info["bias_fingerprint"] is None
    minipissa.save(model.half(), tmp_path / "a.safetensors")  # a cast is no training (load, then cast: the same)
    info, tensors = safefile.read(tmp_path / "a.safetensors")
    assert info["format_version"] == 4 and not [k for k in tensors if k.endswith(".bias")]
    loaded = minipissa.load(base(bias=False), tmp_path / "a.safetensors").half()
    x = torch.randn(3, 16, dtype=torch.float16)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("trained", [False, True])
def test_a_base_with_other_biases_is_refused_before_anything_changes(tmp_path: Path, trained: bool) -> None:
    model = bias_trained()[0] if trained else minipissa.apply(base(), 4, TARGETS)
    minipissa.save(model, tmp_path / "a.safetensors")
    other = base()
    with torch.no_grad():
        other[2].bias[0] += 1e-3
    path = tmp_path / "a.safetensors"
    assert_refused(other, lambda m: minipissa.load(m, path), "module '2': its bias does not match the bias of the base")
    assert_refused(base(bias=False), lambda m: minipissa.load(m, path), "module '2' has no bias, but the adapter")
    unbiased = tmp_path / "b.safetensors"
    minipissa.save(minipissa.apply(base(bias=False), 4, TARGETS), unbiased)
    assert_refused(base(), lambda m: minipissa.load(m, unbiased), "module '2' has a bias, but the adapter was saved")


def test_loading_onto_the_adapted_model_itself_restores_or_checks_its_bias(tmp_path: Path) -> None:
    model, _ = bias_trained()
    minipissa.save(model, tmp_path / "trained.safetensors")
    untrained = tmp_path / "untrained.safetensors"
    minipissa.save(minipissa.apply(base(), 4, TARGETS), untrained)
    x = torch.randn(3, 16)
    expected = model(x)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    minipissa.load(model, tmp_path / "trained.safetensors")  # the same layers: A, B and the bias set
    assert torch.equal(model(x), expected)
    assert_refused(model, lambda m: minipissa.load(m, untrained), "its bias does not match")


@pytest.mark.parametrize("change", ["removed", "added"])
def test_a_bias_removed_or_added_after_apply_is_refused_at_save(tmp_path: Path, change: str) -> None:
    model = minipissa.apply(base(bias=change == "removed"), 4, TARGETS)
    model[2].bias = None if change == "removed" else nn.Parameter(torch.zeros(8))
    what = "lost its bias" if change == "removed" else "was given a bias"
    assert_refused(model, lambda m: minipissa.save(m, tmp_path / "a.safetensors"), f"module '2' {what} after apply")
    assert not list(tmp_path.iterdir())


def test_a_trained_bias_gone_nan_is_refused_at_save(tmp_path: Path) -> None:
    model, _ = bias_trained(steps=1)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    assert_refused(model, lambda m: minipissa.save(m, tmp_path / "a.safetensors"), "trained bias holds NaN")
    assert not list(tmp_path.iterdir())


def test_a_file_without_bias_fingerprints_loads_and_its_layers_fingerprint_the_bias(tmp_path: Path) -> None:
    """Files of format version <= 3 recorded no bias: they load unchecked, and a save then records the bias."""
    model = minipissa.apply(base(), 4, TARGETS)
    minipissa.save(model, tmp_path / "a.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")
    for meta in payload["modules"].values():
        del meta["info"]["bias_fingerprint"]
    write(tmp_path / "old.safetensors", tensors, "adapter", payload)
    loaded = minipissa.load(base(), tmp_path / "old.safetensors")
    assert loaded[2].info["bias_fingerprint"] == model[2].info["bias_fingerprint"]
    loaded[2].bias.requires_grad_(True)
    with torch.no_grad():
        loaded[2].bias.add_(0.25)
    minipissa.save(loaded, tmp_path / "again.safetensors")
    x = torch.randn(3, 16)
    assert torch.equal(minipissa.load(base(), tmp_path / "again.safetensors")(x), loaded(x))


@pytest.mark.parametrize("when", ["before training", "after training"])
def test_a_trained_bias_on_the_residual_base(tmp_path: Path, when: str) -> None:
    """save_residual writes the model's biases as they are: before training (the base's) or after (the trained one):
    both are the bias of this adapter's base, and load(base='residual') gives the trained model."""
    model = minipissa.apply(base(), 4, TARGETS)
    if when == "before training":
        minipissa.save_residual(model, tmp_path / "r.safetensors")
    model[2].bias.requires_grad_(True)
    with torch.no_grad():
        model[2].bias.mul_(1.5)
        model[2].A.add_(0.1)
    if when == "after training":
        minipissa.save_residual(model, tmp_path / "r.safetensors")
    minipissa.save(model, tmp_path / "a.safetensors")
    loaded = minipissa.load(
        minipissa.load_residual(base(), tmp_path / "r.safetensors"), tmp_path / "a.safetensors", base="residual"
    )
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model(x))


def test_a_trained_bias_exports_as_peft_lora_only_and_peft_computes_the_trained_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model, _ = bias_trained()
    minipissa.save(model, tmp_path / "a.safetensors")
    report = minipissa.convert_to_lora(tmp_path / "a.safetensors", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and report.trained_biases == ["2"]
    assert "Biases trained" in (tmp_path / "lora" / "README.md").read_text()
    served = peft.PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        ours, theirs, untrained = model(x), served(x), base()(x)
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()  # float32 rounding of W + B'A'
    assert (ours - untrained).abs().max() > 1e-2 * ours.abs().max()


def test_a_qpissa_layer_saves_and_restores_its_trained_bias(tmp_path: Path) -> None:
    model = minipissa.apply(base(), 4, TARGETS, quantize="nf4")
    model[2].bias.requires_grad_(True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    minipissa.save(model, tmp_path / "q.safetensors")
    x = torch.randn(3, 16)
    assert torch.equal(minipissa.load(base(), tmp_path / "q.safetensors")(x), model(x))


def test_crafted_bias_entries_are_refused(tmp_path: Path) -> None:
    model, _ = bias_trained(steps=1)
    minipissa.save(model, tmp_path / "a.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")

    def crafted(edit, name: str) -> Path:  # type: ignore[no-untyped-def]
        meta, values = json.loads(json.dumps(payload)), dict(tensors)
        edit(meta, values)
        write(tmp_path / name, values, "adapter", meta)
        return tmp_path / name

    cases = {
        "no fingerprint": (lambda p, t: p["modules"]["2"]["info"].__setitem__("bias_fingerprint", None), "a bias_fin"),
        "shape": (lambda p, t: t.__setitem__("2.bias", t["2.bias"][:3]), r"module '2' bias must be floating-point"),
        "int": (lambda p, t: t.__setitem__("2.bias", t["2.bias"].to(torch.int32)), "must be floating-point"),
        "nan": (lambda p, t: t.__setitem__("2.bias", t["2.bias"] * float("nan")), "module '2' bias must be finite"),
        "print shape": (
            lambda p, t: p["modules"]["0"]["info"]["bias_fingerprint"].__setitem__("shape", [8]),
            r"module '0' bias_fingerprint must be an exact fingerprint of a bias of shape \[24\]",
        ),
        "print kind": (lambda p, t: p["modules"]["0"]["info"].__setitem__("bias_fingerprint", 3), "must be an object"),
        "stray": (lambda p, t: t.__setitem__("9.bias", t["2.bias"]), "no module accounts for"),
    }
    for label, (edit, match) in cases.items():
        path = crafted(edit, f"{label}.safetensors")
        with pytest.raises(StateError, match=match):
            minipissa.load(base(), path)


def test_an_adapted_model_whose_base_had_another_bias_is_refused(tmp_path: Path) -> None:
    """Same weights (so the same A0, B0), another bias at apply: the file does not belong to this model."""
    minipissa.save(minipissa.apply(base(), 4, TARGETS), tmp_path / "a.safetensors")
    other = base()
    with torch.no_grad():
        other[2].bias[0] += 1.0
    minipissa.apply(other, 4, TARGETS)
    assert_refused(
        other, lambda m: minipissa.load(m, tmp_path / "a.safetensors"), "adapted on a base with another bias"
    )


def test_a_4bit_residual_base_with_another_bias_is_refused(tmp_path: Path) -> None:
    model = minipissa.apply(base(), 4, TARGETS, quantize="nf4")
    minipissa.save(model, tmp_path / "q.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    residual = minipissa.load_residual(base(), tmp_path / "r.safetensors")
    with torch.no_grad():
        residual[2].bias[0] += 1.0
    path = tmp_path / "q.safetensors"
    assert_refused(residual, lambda m: minipissa.load(m, path, base="residual"), "module '2': its bias does not match")


def test_the_cli_warns_of_trained_biases_in_a_conversion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minipissa.interop.cli import main

    minipissa.save(bias_trained(steps=1)[0], tmp_path / "a.safetensors")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "lora")]) == 0
    assert (
        "warning: the biases of ['2'] were trained and are written as PEFT's bias='lora_only'"
        in capsys.readouterr().err
    )


def test_a_bias_unfrozen_but_not_yet_stepped_is_saved_and_trains_after_load(tmp_path: Path) -> None:
    """Which parameters train is part of the trained state: a bias that requires grad is saved even unchanged (the
    optimizer holds it), and requires grad again after load."""
    model = minipissa.apply(base(), 4, TARGETS)
    model[2].bias.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    loaded = minipissa.load(base(), tmp_path / "a.safetensors")
    assert loaded[2].bias.requires_grad and not loaded[0].bias.requires_grad
