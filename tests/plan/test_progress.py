"""apply(progress=...): the user's callback sees every module; True writes a line to stderr without any extra."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

import minipissa


def chain(n: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)])


def test_a_callback_sees_each_module_once_in_order_up_to_the_total():
    seen: list[tuple[int, int]] = []
    minipissa.apply(chain(5), 2, targets=r"re:\d+", progress=lambda done, total: seen.append((done, total)))
    assert [d for d, _ in seen] == sorted({d for d, _ in seen}), seen  # increasing, no repeats
    assert seen[-1] == (5, 5) and {t for _, t in seen} == {5}


@pytest.mark.parametrize("n", [3, 40])
def test_true_writes_a_line_to_a_log_at_most_every_tenth_and_the_last(capsys, n):
    minipissa.apply(chain(n), 2, targets=r"re:\d+", progress=True)
    lines = capsys.readouterr().err.splitlines()
    counts = [int(m.group(1)) for m in map(re.compile(r"minipissa init: (\d+)/(\d+) modules").match, lines) if m]
    assert len(counts) == len(lines) and counts[-1] == n  # every line is a progress line; the last is complete
    assert len(lines) <= 11 and counts == sorted(counts)


def test_true_rewrites_one_line_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    minipissa.apply(chain(4), 2, targets=r"re:\d+", progress=True)
    text = err.getvalue()
    assert text.count("\r") == 4 and text.rsplit("\r", 1)[1].startswith("minipissa init: 4/4 modules")
    assert text.count("\n") == 1 and text.endswith("\n")


def test_false_writes_nothing(capsys):
    minipissa.apply(chain(3), 2, targets=r"re:\d+")
    assert capsys.readouterr().err == ""
