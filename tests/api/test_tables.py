"""summary() and `minipissa inspect`: one row per adapted module, aligned whatever the names' lengths, in the
model's order (the order of named_modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import minipissa
from minipissa.interop.cli import main

LONG = "encoder_block_with_a_rather_long_name.attention_output_projection"


class Named(nn.Module):
    """Modules whose model order is not their alphabetical order, one name 60+ characters long."""

    def __init__(self) -> None:
        super().__init__()
        self.zeta = nn.Linear(8, 12)
        self.encoder_block_with_a_rather_long_name = nn.ModuleDict({"attention_output_projection": nn.Linear(12, 12)})
        self.alpha = nn.Linear(12, 4)


ORDER = ["zeta", LONG, "alpha"]


def column_starts(header: str, columns: list[str]) -> list[int]:
    return [header.index(c) for c in columns]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_summary_rows_line_up_in_model_order(quantize):
    torch.manual_seed(0)
    model = minipissa.apply(Named(), 2, ORDER, quantize=quantize)
    lines = str(minipissa.summary(model)).splitlines()
    header, rows = lines[0], lines[1:4]
    assert [r.split()[0] for r in rows] == ORDER
    assert len({len(line) for line in (header, *rows)}) == 1, lines  # names left, every other column right-aligned
    end = header.index("out x in") + len("out x in")
    assert all(r[end - 1] != " " and r[end] == " " for r in rows)  # the shapes end under their header


def test_inspect_rows_line_up_in_model_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    torch.manual_seed(0)
    model = minipissa.apply(Named(), 2, ORDER)
    minipissa.save(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("module "))
    header, rows = lines[at], lines[at + 1 : at + 4]
    assert [r.split()[0] for r in rows] == ORDER  # the model's order, as summary() lists them
    top = header.index("top singular values")
    assert all(r[top - 2 : top] == "  " and r[top] != " " for r in rows), lines  # the last column starts in line
    end = header.index("dtype") + len("dtype")
    assert all(r[end - 7 : end] == "float32" for r in rows)


def test_a_file_without_the_order_lists_its_modules_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Files written before 0.2.0 hold no module_order: inspect and load take their sorted order."""
    from snapshots import editable

    from minipissa.io import safefile

    torch.manual_seed(0)
    minipissa.save(minipissa.apply(Named(), 2, ORDER), tmp_path / "a.safetensors")
    info, tensors = editable(tmp_path / "a.safetensors")
    del info["module_order"]
    safefile.write(tmp_path / "old.safetensors", tensors, "adapter", info)
    assert main(["inspect", str(tmp_path / "old.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("module "))
    assert [r.split()[0] for r in lines[at + 1 : at + 4]] == sorted(ORDER)
