"""python -m minipissa: inspect and convert on saved files, and the exit codes of expected errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MLP

import minipissa
from minipissa.interop.cli import main
from minipissa.io import safefile


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minipissa", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An r = 16 adapter (converts to r = 32, above vLLM's default limit) and its residual."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = minipissa.apply(MLP((32, 48, 24)), 16, ["layers.0", "layers.1"], niter=2)
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(0.1 * torch.randn_like(layer.A))
    minipissa.save(model, root / "adapter.safetensors")
    minipissa.save_residual(model, root / "residual.safetensors")
    data = (root / "adapter.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return root


def test_inspect(files: Path) -> None:
    done = run("inspect", files / "adapter.safetensors")
    assert done.returncode == 0, done.stderr
    assert f"format version {safefile.FORMAT_VERSION}" in done.stdout and "niter=2" in done.stdout
    assert "layers.0" in done.stdout and "48 x 32" in done.stdout and "layers.1" in done.stdout
    size = (files / "adapter.safetensors").stat().st_size
    assert f"file {size:,} bytes" in done.stdout


def test_convert_warns_above_serving_rank(files: Path) -> None:
    out = files / "lora"
    done = run("convert", files / "adapter.safetensors", out)
    assert done.returncode == 0, done.stderr
    assert "r = lora_alpha = 32" in done.stdout and "vLLM needs max_lora_rank >= 32: 32" in done.stdout
    assert "exceeds 16" in done.stderr and "--rank 16" in done.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 32

    done = run("convert", files / "adapter.safetensors", files / "lora16", "--rank", "16", "--prefix", "x.")
    assert done.returncode == 0, done.stderr
    assert "relative error" in done.stdout and "exceeds" not in done.stderr
    assert json.loads((files / "lora16" / "adapter_config.json").read_text())["r"] == 16

    done = run("convert", files / "adapter.safetensors", files / "snapped", "--rank", "20", "--snap")
    assert done.returncode == 0, done.stderr
    assert "(--rank 20 snapped to 16)" in done.stdout
    assert json.loads((files / "snapped" / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "missing.safetensors"), "does not exist"),
        (("inspect", "truncated.safetensors"), "truncated or corrupted"),
        (("convert", "adapter.safetensors", "out", "--rank", "0"), "--rank: must be an integer >= 1, got '0'"),
        (("convert", "adapter.safetensors", "out", "--rank", "0", "--snap"), "--rank: must be an integer >= 1"),
        (("convert", "adapter.safetensors", "out", "--prefix", "model"), "prefix must be a str ending in '.'"),
        (("convert", "adapter.safetensors", "out", "--task-type", "causal_lm"), "task_type must be None or one"),
        (("convert", "residual.safetensors", "out"), "expected kind 'adapter'"),
        (("convert",), "required"),  # argparse usage error
    ],
)
def test_expected_errors_exit_2_without_traceback(files: Path, args: tuple[str, ...], message: str) -> None:
    resolved = [str(files / a) if a.endswith((".safetensors", "out")) else a for a in args]
    done = run(*resolved)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (files / "out").exists()


def test_inspect_residual_in_process(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files / "residual.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "residual file" in out and "2 modules" in out


def test_inspect_into_a_pipe_closed_early_is_quiet(files: Path) -> None:
    """`inspect FILE | head -1`: the reader leaves before the writer is done; no Broken-pipe traceback."""
    command = f"'{sys.executable}' -m minipissa inspect '{files / 'adapter.safetensors'}' | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr and "Exception" not in done.stderr


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT PiSSA run on the tiny Llama (q_proj, v_proj; its 'init' and 'trained' adapters) and the base
    checkpoint of the adapted modules' weights, 'base.safetensors'."""
    pytest.importorskip("peft")
    from models import tiny_llama
    from peft_runs import peft_pissa_run
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("import_peft")
    peft_pissa_run(tiny_llama, ["q_proj", "v_proj"], root, "pissa")
    weights = {k: v.contiguous() for k, v in tiny_llama().state_dict().items() if "_proj" in k}
    save_file(weights, str(root / "base.safetensors"))
    return root


Q0 = "model.layers.0.self_attn.q_proj.weight"
BASE_EDITS = {
    "NaN in the base": lambda w: w[Q0].__setitem__((1, 2), float("nan")),
    "inf in the base": lambda w: w[Q0].__setitem__((1, 2), float("inf")),
    "base weight mis-shaped": lambda w: w.update({Q0: w[Q0][:, :63].contiguous()}),
    "base weight a vector": lambda w: w.update({Q0: w[Q0][0].contiguous()}),
    "base weight integer": lambda w: w.update({Q0: w[Q0].long()}),
    "base lacks a module": lambda w: w.pop(Q0),
    "base of another checkpoint": lambda w: w.update({Q0: w[Q0].flip(0).contiguous()}),
}


def import_peft_args(run: Path, tmp: Path, case: str) -> list[Path]:
    """INITIAL TRAINED BASE OUT of the run, with what ``case`` names broken (in copies under ``tmp``)."""
    from peft_runs import crafted
    from safetensors.torch import load_file, save_file

    initial, trained, base, out = run / "init", run / "trained", run / "base.safetensors", tmp / "o"
    if case in BASE_EDITS:
        weights = load_file(str(base))
        BASE_EDITS[case](weights)
        save_file(weights, str(tmp / "edited.safetensors"))
        base = tmp / "edited.safetensors"
    elif case == "base not safetensors":
        (tmp / "base.txt").write_text("not a checkpoint")
        base = tmp / "base.txt"
    elif case in ("base missing", "base is a directory"):
        base = tmp / "missing.safetensors" if case == "base missing" else tmp
    elif case in ("initial missing", "trained missing"):
        initial, trained = (tmp / "none", trained) if case.startswith("initial") else (initial, tmp / "none")
    elif case == "trained tensor mis-shaped":
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        trained = crafted(trained, tmp / "t", tensors=lambda t: t.update({key: torch.zeros(65, 4)}))
    elif case == "bad config value":
        trained = crafted(trained, tmp / "t", config=lambda c: c.update(use_rslora="false"))
    elif case in ("bad JSON", "tensors not safetensors"):
        trained = crafted(trained, tmp / "t")
        if case == "bad JSON":
            (trained / "adapter_config.json").write_text('{"r": 4,')
        else:
            (trained / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    elif case == "out in a missing directory":
        out = tmp / "no" / "such" / "dir" / "a.safetensors"
    return [initial, trained, base, out]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("base not safetensors", "is not a readable safetensors checkpoint (the base model's weights)"),
        ("base missing", "is not a readable safetensors checkpoint"),
        ("base is a directory", "is not a readable safetensors checkpoint"),
        ("NaN in the base", "the base weight of module 'model.layers.0.self_attn.q_proj' holds NaN"),
        ("inf in the base", "holds NaN or infinite"),
        ("base weight mis-shaped", "module 'model.layers.0.self_attn.q_proj' is (64, 63) in the model"),
        ("base weight a vector", "is not a matrix"),
        ("base weight integer", "do not fit the model: .*torch.int64 weight"),
        ("base lacks a module", "the base checkpoint has no 'model.layers.0.self_attn.q_proj.weight'"),
        ("base of another checkpoint", "are not a PiSSA init of this base weight"),
        ("trained tensor mis-shaped", "different modules or shapes"),
        ("initial missing", "is not a readable PEFT adapter directory.*The initial adapter"),
        ("trained missing", "is not a readable PEFT adapter directory"),
        ("bad JSON", "is not a readable PEFT adapter directory: Expecting"),
        ("bad config value", "use_rslora must be true or false, got 'false'"),
        ("tensors not safetensors", "is not a readable safetensors file (the adapter's tensors)"),
        ("out in a missing directory", ""),
    ],
)
def test_import_peft_errors_exit_2_with_a_message(peft_run, tmp_path, case, message, capsys) -> None:  # type: ignore[no-untyped-def]
    """Every bad input: exit status 2 and one 'error: ...' line (main returns; no exception escapes it), no file."""
    args = import_peft_args(peft_run, tmp_path, case)
    assert main(["import-peft", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: minipissa") and err.count("\n") == 1, err
    assert re.search(re.escape(message).replace(r"\.\*", ".*"), err), err
    assert not args[-1].exists()


def test_import_peft_error_in_a_process_has_no_traceback(peft_run: Path, tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("not a checkpoint")
    done = run("import-peft", peft_run / "init", peft_run / "trained", tmp_path / "base.txt", tmp_path / "o")
    assert done.returncode == 2 and "not a readable safetensors checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()
