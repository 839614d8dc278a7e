"""Files of double-quantized QPiSSA residuals: the adapter file (load rebuilds the 8-bit statistics bit-exactly and
checks them against the file's checksum), residual files (``.absmax_codes`` / ``.absmax_scale`` / ``.absmax_offset``
in place of ``.absmax``), inspect; files without double quantization stay what they were (no new field), and the
single-quantized files of before (fixtures/make_nf4_files.py, commit 0090e92) still load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bounds
import seams
import torch
from models import MLP, tiny_gpt2
from safetensors.torch import load_file
from snapshots import assert_refused, editable

import minipissa
from minipissa.core import nf4
from minipissa.interop import cli
from minipissa.io import safefile

FIXTURES = Path(__file__).parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_nf4_files  # noqa: E402

TARGETS = ["c_attn", "c_fc"]


def trained_dq(seed: int = 3) -> torch.nn.Module:
    model = minipissa.apply(tiny_gpt2(seed=seed), 4, TARGETS, alpha=8, quantize="nf4", quant_iters=2, double_quant=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def assert_same_residuals(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = list(zip(minipissa.pissa_layers(a), minipissa.pissa_layers(b), strict=True))
    assert pairs
    for (_, x), (_, y) in pairs:
        assert x.weight.double_quant and y.weight.double_quant
        mine, theirs = (x.weight.codes, *x.weight.statistics()), (y.weight.codes, *y.weight.statistics())
        for s, t in zip(mine, theirs, strict=True):
            assert s.dtype == t.dtype and torch.equal(s, t) and s.data_ptr() != t.data_ptr()


def test_save_load_rebuilds_the_double_quantized_residual_bit_exactly(tmp_path: Path, monkeypatch):
    model = trained_dq()
    minipissa.save(model, tmp_path / "a.safetensors")
    info, recs, _ = minipissa.io.adapter_file.read(tmp_path / "a.safetensors")
    assert info["config"]["double_quant"] is True and all(r.info["double_quant"] is True for r in recs)
    assert info["format_version"] == safefile.FORMAT_VERSION
    loaded = minipissa.load(tiny_gpt2(seed=3), tmp_path / "a.safetensors")
    assert_same_residuals(loaded, model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Statistics rebuilt otherwise (one scale a bit off): refused by the checksum, the model unchanged.
    real = seams.real("rebuilt 4-bit residual")

    def other_statistics(*args):
        made = real(*args)
        made.absmax_scale.view(torch.int32)[0] ^= 1
        return made

    seams.replace(monkeypatch, "rebuilt 4-bit residual", other_statistics)
    assert_refused(tiny_gpt2(seed=3), lambda m: minipissa.load(m, tmp_path / "a.safetensors"), "other codes")


def test_residual_files_hold_the_8bit_statistics_and_reload_bit_exactly(tmp_path: Path, capsys):
    model = trained_dq()
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    info, tensors = safefile.read(tmp_path / "r.safetensors")
    name = "transformer.h.0.attn.c_attn"
    assert info["quantized"][name]["double_quant"] is True
    keys = {k for k in tensors if k.startswith(f"{name}.weight")}
    assert keys == {f"{name}.weight.{k}" for k in ("codes", "absmax_codes", "absmax_scale", "absmax_offset")}
    fresh = minipissa.load_residual(tiny_gpt2(seed=5), tmp_path / "r.safetensors")
    frozen = fresh.transformer.h[0].attn.c_attn
    assert isinstance(frozen, minipissa.NF4Linear) and frozen.weight.double_quant
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), minipissa.disabled(model):
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    minipissa.load(fresh, tmp_path / "a.safetensors", base="residual")
    assert_same_residuals(fresh, model)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # inspect names the quantizer and the bytes, of both files
    stored = sum(layer.weight.bytes for _, layer in minipissa.pissa_layers(model))
    for path in ("a", "r"):
        assert cli.main(["inspect", str(tmp_path / f"{path}.safetensors")]) == 0
        out = capsys.readouterr().out
        assert "nf4+dq" in out and f"{stored:,} bytes" in out, out


def test_a_residual_of_the_other_kind_under_the_adapter_is_refused(tmp_path: Path):
    """A single-quantized residual under a double-quantized adapter, and the reverse: a named error."""
    for dq in (False, True):
        model = minipissa.apply(MLP(), 2, "all-linear", quantize="nf4", double_quant=dq)
        minipissa.save(model, tmp_path / f"a{dq}.safetensors")
        minipissa.save_residual(model, tmp_path / f"r{dq}.safetensors")
    for dq in (False, True):
        fresh = minipissa.load_residual(MLP(), tmp_path / f"r{not dq}.safetensors")
        kind = "double-quantized" if not dq else "single-quantized"
        call = lambda m, dq=dq: minipissa.load(m, tmp_path / f"a{dq}.safetensors", base="residual")  # noqa: E731
        assert_refused(fresh, call, f"its 4-bit residual is {kind}")


def test_crafted_double_quant_fields_are_refused(tmp_path: Path):
    model = minipissa.apply(MLP(), 2, "all-linear", quantize="nf4", double_quant=True)
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")
    for value, match in [("yes", "double_quant must be true or false"), (False, "residual_fingerprint")]:
        crafted = json.loads(json.dumps(payload))
        crafted["modules"]["layers.0"]["info"]["double_quant"] = value
        safefile.write(tmp_path / "c.safetensors", tensors, "adapter", crafted)
        assert_refused(MLP(), lambda m: minipissa.load(m, tmp_path / "c.safetensors"), match)
    crafted = json.loads(json.dumps(payload))
    crafted["modules"]["layers.0"]["info"]["quantize"] = None  # double_quant left without a quantizer
    safefile.write(tmp_path / "c.safetensors", tensors, "adapter", crafted)
    assert_refused(MLP(), lambda m: minipissa.load(m, tmp_path / "c.safetensors"), "pass quantize='nf4' too")

    payload, tensors = editable(tmp_path / "r.safetensors")
    for edit in ("flag", "missing", "negative", "shape"):
        crafted, bad = json.loads(json.dumps(payload)), dict(tensors)
        if edit == "flag":
            crafted["quantized"]["layers.0"]["double_quant"] = "yes"
        elif edit == "missing":
            del bad["layers.0.weight.absmax_scale"]
        elif edit == "negative":
            bad["layers.0.weight.absmax_offset"] = -bad["layers.0.weight.absmax_offset"] - 1
        else:
            bad["layers.0.weight.absmax_codes"] = bad["layers.0.weight.absmax_codes"][:-1]
        safefile.write(tmp_path / "c.safetensors", bad, "residual", crafted)
        match = {"negative": "negative or non-finite", "shape": "double-quantized absmax"}.get(edit, "malformed")
        assert_refused(MLP(), lambda m: minipissa.load_residual(m, tmp_path / "c.safetensors"), match)


def test_files_without_double_quant_are_what_they_were(tmp_path: Path):
    """No new field in a file that does not use double quantization: readers of before keep reading it."""
    model = minipissa.apply(MLP(), 2, "all-linear", quantize="nf4")
    assert "double_quant" not in model.layers[0].info
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    for path in ("a", "r"):
        info, _ = safefile.read(tmp_path / f"{path}.safetensors")
        assert info["format_version"] == 4 and "double_quant" not in json.dumps(info)


def test_the_single_quantized_files_of_before_still_load():
    """Written at commit 0090e92: the adapter rebuilds the same codes and absmax and gives the same outputs; the
    residual file loads into NF4Linear modules with those very codes."""
    expected = load_file(str(FIXTURES / "nf4_expected.safetensors"))
    model = minipissa.load(make_nf4_files.base(), FIXTURES / "nf4_adapter.safetensors")
    assert not model[0].weight.double_quant
    assert torch.equal(model[0].weight.codes, expected["codes"])
    assert torch.equal(model[0].weight.absmax, expected["absmax"])
    x = make_nf4_files.inputs()
    with torch.no_grad():  # bit for bit on the machine that wrote the fixture; elsewhere within its CPU's rounding
        assert same_within(model(x), expected["y"], bounds.rounding_only([model[0], model[2]], x))
    frozen = minipissa.load_residual(make_nf4_files.base(), FIXTURES / "nf4_residual.safetensors")
    assert isinstance(frozen[0], minipissa.NF4Linear) and torch.equal(frozen[0].weight.absmax, expected["absmax"])
    minipissa.load(frozen, FIXTURES / "nf4_adapter.safetensors", base="residual")
    with torch.no_grad():
        assert same_within(frozen(x), expected["y"], bounds.rounding_only([frozen[0], frozen[2]], x))
    assert nf4.stored_bytes(48 * 33) == frozen[0].weight.bytes


def same_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((got.double() - want.double()).abs() <= bound).all())
