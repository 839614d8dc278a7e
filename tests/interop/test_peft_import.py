"""import_peft against adapters that real PEFT writes: PiSSA exact and pissa_niter_K, Llama and GPT-2 (Conv1D)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from snapshots import assert_refused
from torch import nn

import minipissa
from minipissa import StateError

peft = pytest.importorskip("peft")


def peft_pissa_run(build, targets, tmp_path: Path, init: str, **lora) -> tuple[nn.Module, Path, Path]:  # type: ignore[no-untyped-def]
    """PEFT's PiSSA: init (saved: the 'pissa_init' adapter), a few AdamW steps (saved: the trained adapter)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **lora)
    model = peft.get_peft_model(build(), config)
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "trained")
    return model.eval(), tmp_path / "init", tmp_path / "trained"


@pytest.mark.parametrize(
    ("build", "targets", "init", "lora"),
    [
        (tiny_llama, ["q_proj", "v_proj"], "pissa", {}),
        (tiny_llama, ["q_proj", "down_proj"], "pissa_niter_4", {"use_rslora": True, "alpha_pattern": {"down_proj": 3}}),
        (tiny_gpt2, ["c_attn", "c_fc"], "pissa", {"fan_in_fan_out": True}),
    ],
)
def test_a_peft_pissa_adapter_imports_onto_the_original_model(tmp_path, build, targets, init, lora) -> None:  # type: ignore[no-untyped-def]
    served, initial, trained = peft_pissa_run(build, targets, tmp_path, init, **lora)
    model = minipissa.import_peft(build(), initial, trained)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(ids).logits, served(ids).logits
        with minipissa.original(model):
            original = model(ids).logits
        base = build()(ids).logits
    # The residuals differ by rounding only (PEFT subtracts s·B0A0 from W in its own order): the tolerance of
    # test_convert's PEFT comparisons; and original() is the untouched base model up to the same rounding.
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    assert (original - base).abs().max() <= 1e-4 * scale
    assert (ours - base).abs().max() > 1e-3 * scale  # the trained adapter really changes the model
    gaps = []  # minipissa's residual W - s·B0·A0 against PEFT's, relative (fp32 rounding; printed for the record)
    for name, layer in minipissa.pissa_layers(model):
        theirs_residual = served.get_submodule(f"base_model.model.{name}").base_layer.weight
        gaps.append(((layer.weight - theirs_residual).norm() / layer.weight.norm()).item())
    print(f"residual gap to PEFT's: max {max(gaps):.2e}")
    assert max(gaps) < 1e-5
    # A minipissa file of it reloads bit-exactly onto the original base, and converts.
    minipissa.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(minipissa.load(build(), tmp_path / "a.safetensors")(ids).logits, ours)
    info = json.loads(json.dumps(minipissa.io.adapter_file.read(tmp_path / "a.safetensors")[1][0].info))
    assert info["init"] == "pissa" and info["niter"] == (4 if init == "pissa_niter_4" else None)


def test_imports_without_the_initial_adapter_or_from_another_run_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = peft_pissa_run(tiny_llama, ["q_proj"], tmp_path / "a", "pissa")
    _, other_initial, _ = peft_pissa_run(tiny_llama, ["v_proj"], tmp_path / "b", "pissa")
    lora_init = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora_init.save_pretrained(tmp_path / "plain")
    for first, match in [
        (tmp_path / "missing", "not a readable PEFT adapter directory.*The initial adapter .*is needed"),
        (other_initial, "different modules or ranks"),
        (tmp_path / "plain", "init_lora_weights=True; the initial adapter must be PEFT's PiSSA init"),
    ]:
        assert_refused(tiny_llama(), lambda m, first=first: minipissa.import_peft(m, first, trained), match)
    assert_refused(tiny_gpt2(), lambda m: minipissa.import_peft(m, initial, trained), "do not fit the model")
    with pytest.raises(StateError):
        minipissa.import_peft(tiny_llama(), initial, tmp_path / "missing")


@pytest.mark.parametrize(
    ("build", "targets", "lora"), [(tiny_llama, ["q_proj"], {}), (tiny_gpt2, ["c_attn"], {"fan_in_fan_out": True})]
)
def test_the_command_line_imports_from_the_base_checkpoint_alone(tmp_path, build, targets, lora) -> None:  # type: ignore[no-untyped-def]
    """`python -m minipissa import-peft INITIAL TRAINED BASE OUT` needs no model: the file it writes loads onto the
    base model and gives what import_peft gives there, bit for bit."""
    from safetensors.torch import save_file

    from minipissa.interop.cli import main

    _, initial, trained = peft_pissa_run(build, targets, tmp_path, "pissa", **lora)
    weights = {k: v.contiguous() for k, v in build().state_dict().items() if any(t in k for t in targets)}
    save_file(weights, str(tmp_path / "base.safetensors"))
    assert (
        main(["import-peft", str(initial), str(trained), str(tmp_path / "base.safetensors"), str(tmp_path / "a.st")])
        == 0
    )
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        from_file = minipissa.load(build(), tmp_path / "a.st")(ids).logits
        direct = minipissa.import_peft(build(), initial, trained)(ids).logits
    assert torch.equal(from_file, direct)
