"""Every public function fed a wrong argument (None, a bool for an int, a str for a list, a dict with bad keys, an
unknown choice...): a named error of the right type that says what to do, never a raw AttributeError, TypeError or
re.error from deep inside, and nothing changed: neither the model nor the files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.interop.peft_export import snap_rank


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


T = ["0", "2"]

# (call, expected error, fragment of its message): call(model, adapted, tmp) with a plain `model`, an adapted model,
# and a directory holding "a.safetensors" (an adapter) and "r.safetensors" (a residual file) of that adapted model.
CASES: dict[str, tuple[Callable[[nn.Module, nn.Module, Path], Any], type[Exception], str]] = {
    "apply model None": (lambda m, a, d: minipissa.apply(None, 4, T), TypeError, "apply: the model must be a torch"),
    "apply model dict": (lambda m, a, d: minipissa.apply({"0": m}, 4, T), TypeError, "got dict"),
    "apply rank int key": (lambda m, a, d: minipissa.apply(m, {1: 4}, T), TypeError, "`rank` key must be a module"),
    "apply rank bad regex key": (
        lambda m, a, d: minipissa.apply(m, {"re:(": 4, "*": 2}, T), ValueError, "`rank` key 're:\\(' is not a valid"),
    "apply alpha int key": (
        lambda m, a, d: minipissa.apply(m, 4, T, alpha={0: 8.0}), TypeError, "`alpha` key must be a module name"),
    "apply alpha bad regex key": (
        lambda m, a, d: minipissa.apply(m, 4, T, alpha={"re:[": 8.0}), ValueError, "`alpha` key 're:\\[' is not"),
    "apply rank key matching nothing": (
        lambda m, a, d: minipissa.apply(m, {"*": 4, "q_prj": 2}, T), ValueError,
        r"`rank` pattern\(s\) \['q_prj'\] match no adapted module"),
    "apply alpha key matching nothing": (
        lambda m, a, d: minipissa.apply(m, 4, ["0"], alpha={"2": 8.0}), ValueError,
        r"`alpha` pattern\(s\) \['2'\] match no adapted module"),
    "apply progress int": (
        lambda m, a, d: minipissa.apply(m, 4, T, progress=3), TypeError, "progress must be True/False or a callable"),
    "apply progress None": (lambda m, a, d: minipissa.apply(m, 4, T, progress=None), TypeError, "progress must be"),
    "apply progress str": (lambda m, a, d: minipissa.apply(m, 4, T, progress="yes"), TypeError, "progress must be"),
    "apply fan_in_fan_out str": (
        lambda m, a, d: minipissa.apply(m, 4, T, fan_in_fan_out="no"), TypeError,
        "fan_in_fan_out must be None \\(detect\\) or a bool"),
    "apply fan_in_fan_out int": (
        lambda m, a, d: minipissa.apply(m, 4, T, fan_in_fan_out=0), TypeError, "fan_in_fan_out must be None"),
    "apply train_modules bad regex": (
        lambda m, a, d: minipissa.apply(m, 4, ["0"], train_modules="re:("), ValueError,
        "`train_modules` pattern 're:\\(' is not a valid regex"),
    "apply targets bad regex in list": (
        lambda m, a, d: minipissa.apply(m, 4, ["0", "re:)"]), ValueError, "`targets` pattern 're:\\)' is not"),
    "save model None": (lambda m, a, d: minipissa.save(None, d / "x.safetensors"), TypeError, "save: the model must"),
    "save optimizer str": (
        lambda m, a, d: minipissa.save(a, d / "x.safetensors", optimizer="adam"), TypeError,
        "save: optimizer must be a torch.optim.Optimizer or None"),
    "load model None": (lambda m, a, d: minipissa.load(None, d / "a.safetensors"), TypeError, "load: the model must"),
    "load model str": (lambda m, a, d: minipissa.load("model", d / "a.safetensors"), TypeError, "got str"),
    "load optimizer list": (
        lambda m, a, d: minipissa.load(a, d / "a.safetensors", optimizer=[]), TypeError, "load: optimizer must be"),
    "convert prefix None": (
        lambda m, a, d: minipissa.convert_to_lora(a, d / "c", prefix=None), StateError,
        "prefix must be a str ending in '.'"),
    "convert prefix int": (lambda m, a, d: minipissa.convert_to_lora(a, d / "c", prefix=5), StateError, "got 5"),
    "convert prefix without a dot": (
        lambda m, a, d: minipissa.convert_to_lora(d / "a.safetensors", d / "c", prefix="base_model.model"),
        StateError, "prefix must be a str ending in '.'"),
    "convert task_type unknown": (
        lambda m, a, d: minipissa.convert_to_lora(a, d / "c", task_type="causal_lm"), StateError,
        "task_type must be None or one of \\('SEQ_CLS'"),
    "convert model None": (lambda m, a, d: minipissa.convert_to_lora(None, d / "c"), StateError, "must be a non-empty"),
    "save_residual model None": (
        lambda m, a, d: minipissa.save_residual(None, d / "y.safetensors"), TypeError, "save_residual: the model"),
    "load_residual model None": (
        lambda m, a, d: minipissa.load_residual(None, d / "r.safetensors"), TypeError, "load_residual: the model"),
    "merge None": (lambda m, a, d: minipissa.merge(None), TypeError, "merge: the model must be a torch.nn.Module"),
    "merge str": (lambda m, a, d: minipissa.merge("model"), TypeError, "merge: the model must"),
    "unmerge None": (lambda m, a, d: minipissa.unmerge(None), TypeError, "unmerge: the model must"),
    "unload None": (lambda m, a, d: minipissa.unload(None), TypeError, "unload: the model must"),
    "original None": (lambda m, a, d: minipissa.original(None).__enter__(), TypeError, "original: the model must"),
    "disabled None": (lambda m, a, d: minipissa.disabled(None).__enter__(), TypeError, "disabled: the model must"),
    "pissa_layers None": (lambda m, a, d: list(minipissa.pissa_layers(None)), TypeError, "pissa_layers: the model"),
    "import_peft model None": (
        lambda m, a, d: minipissa.import_peft(None, d, d), TypeError, "import_peft: the model must be a torch.nn"),
    "summary None": (lambda m, a, d: minipissa.summary(None), TypeError, "summary: the model must be a torch.nn"),
    "snap_rank 0": (lambda m, a, d: snap_rank(0), ValueError, "a rank to snap must be an int >= 1, got 0"),
    "snap_rank True": (lambda m, a, d: snap_rank(True), ValueError, "got True"),
}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    minipissa.save(minipissa.apply(net(), 4, T), folder / "a.safetensors")
    minipissa.save_residual(minipissa.apply(net(), 4, T), folder / "r.safetensors")
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_argument_is_a_named_error_and_changes_nothing(case: str, files: Path) -> None:
    call, error, fragment = CASES[case]
    model, adapted = net(), minipissa.apply(net(), 4, T)
    before, adapted_before = snapshot(model), snapshot(adapted)
    listing = sorted(p.name for p in files.iterdir())
    with pytest.raises(error, match=fragment) as caught:
        call(model, adapted, files)
    assert str(caught.value).startswith("minipissa"), caught.value
    assert_unchanged(model, before)
    assert_unchanged(adapted, adapted_before)
    assert sorted(p.name for p in files.iterdir()) == listing
