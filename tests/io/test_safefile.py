"""File operations at the OS level: what a killed, failing or racing writer leaves, and what a reader sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import seams
import torch
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.io import atomic

WRITER = """
import sys, time, torch, minipissa
from minipissa.io import safefile
torch.manual_seed(0)
model = minipissa.apply(torch.nn.Sequential(torch.nn.Linear(64, 64)), 4, "0")
real = safefile.write_safetensors
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata)
    print("writing", flush=True)
    time.sleep(60)  # killed here, its temporary file written
safefile.write_safetensors = slow
minipissa.save(model, sys.argv[1])
"""


def adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return minipissa.apply(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)), 4, ["0", "2"])


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if atomic.TEMP.fullmatch(p.name))


def test_temporary_files_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "a.safetensors"
    for _ in range(2):  # kill -9 in the middle of writing
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The second writer removed the first's temporary file (its process was gone); its own is left.
    assert len(temps(tmp_path)) == 1 and not path.exists()
    mine = tmp_path / f".minipissa-00000000-{os.getpid()}-{'0' * 16}.tmp"  # a live writer's: kept
    mine.write_bytes(b"in progress")
    minipissa.save(adapted(), path)
    assert temps(tmp_path) == [mine.name]
    minipissa.load(nn.Sequential(*adapted_base()), path)


def adapted_base() -> list[nn.Module]:
    torch.manual_seed(0)
    return list(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)))


def test_a_file_name_of_243_characters_can_be_saved(tmp_path):
    path = tmp_path / ("a" * 231 + ".safetensors")
    assert len(path.name) == 243
    minipissa.save(adapted(), path)
    assert path.is_file() and not temps(tmp_path)


def test_the_temporary_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    minipissa.save(adapted(), tmp_path / "a.safetensors")
    assert events == ["fsync", "replace", "fsync"]


@pytest.mark.parametrize("path", [None, b"/tmp/a.safetensors", 3, ""])
def test_paths_that_are_no_paths_are_named(path, tmp_path):
    model = adapted()
    with pytest.raises(StateError, match="must be a non-empty str or pathlib.Path"):
        minipissa.save(model, path)
    with pytest.raises(StateError, match="must be a non-empty str or pathlib.Path"):
        minipissa.load(nn.Sequential(*adapted_base()), path)


def test_an_unreadable_file_says_why(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    minipissa.save(adapted(), path)
    real_open = open

    def denied(file, *args, **kwargs):  # the tests run as root, for whom mode 000 changes nothing
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(StateError, match="cannot be opened: Permission denied"):
        minipissa.load(nn.Sequential(*adapted_base()), path)


RESAVER = """
import sys, torch, minipissa
from torch import nn
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(minipissa.apply(nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8)), 4, ["0", "2"]))
i = 0
while True:
    minipissa.save(models[i % 2], sys.argv[1])
    i += 1
"""


def test_loads_racing_resaves_always_see_one_whole_version(tmp_path):
    """A file renamed over the one being read cannot mix two versions: safetensors reopens the file by name for
    the tensors, so it is given the very file opened (365 of 17,235 loads failed against a writer process
    before)."""
    path = tmp_path / "a.safetensors"
    minipissa.save(adapted(), path)
    writer = subprocess.Popen([sys.executable, "-c", RESAVER, str(path)])
    try:
        time.sleep(2)  # the writer is saving in a loop
        deadline, loads = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            minipissa.io.adapter_file.read(path)  # raises StateError on a mixed file
            loads += 1
    finally:
        writer.kill()
        writer.wait()
    assert loads > 100


def test_convert_failing_between_its_files_leaves_the_old_pair(tmp_path, monkeypatch):
    out = tmp_path / "lora"
    first, second = adapted(0), adapted(1)
    minipissa.convert_to_lora(first, out)
    (out / "notes.txt").write_text("mine")  # a file of the user's, kept through every conversion
    old = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(path: str, text: str) -> None:
        raise OSError("disk full")

    seams.replace(monkeypatch, "PEFT config write", fail)
    with pytest.raises(OSError, match="disk full"):
        minipissa.convert_to_lora(second, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert not temps(tmp_path)
    monkeypatch.undo()
    minipissa.convert_to_lora(second, out)
    new = {p.name: p.read_bytes() for p in out.iterdir()}
    assert new["notes.txt"] == b"mine" and new["adapter_model.safetensors"] != old["adapter_model.safetensors"]
    assert new["README.md"].startswith(b"---\nbase_model:")  # the model card, rewritten with the adapter


def test_convert_killed_between_its_renames_is_repaired_by_the_next(tmp_path, monkeypatch):
    """The one window: the old directory moved aside, the new one not yet in place. No mixed pair exists, and
    the next conversion to that directory puts the old one back first."""
    out = tmp_path / "lora"
    minipissa.convert_to_lora(adapted(0), out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename
    calls = []

    def dies_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed: nothing after this runs
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dies_second)
    with pytest.raises(KeyboardInterrupt):
        minipissa.convert_to_lora(adapted(1), out)
    monkeypatch.undo()
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == old
    # The "killed" writer was this process; make its aside directory look like a dead process's.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    renamed = aside[0].with_name(aside[0].name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    aside[0].rename(renamed)
    report = minipissa.convert_to_lora(adapted(1), out)
    assert report.modules == 2 and (out / "adapter_config.json").is_file() and not renamed.exists()


def test_load_residual_refuses_a_meta_model(tmp_path):
    minipissa.save_residual(adapted(), tmp_path / "r.safetensors")
    with torch.device("meta"):
        meta = nn.Sequential(*adapted_base())
    before = snapshot(meta)
    with pytest.raises(StateError, match="meta device"):
        minipissa.load_residual(meta, tmp_path / "r.safetensors")
    assert_unchanged(meta, before)
