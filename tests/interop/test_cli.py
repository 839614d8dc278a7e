"""python -m minipissa: inspect and convert on saved files, and the exit codes of expected errors."""

from __future__ import annotations

import json
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
