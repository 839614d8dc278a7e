"""The package as users get it: the wheel holds every module, and the suite tests the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import minipissa

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "minipissa"


def source_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in SOURCE.rglob("*.py")}


def test_wheel_holds_every_module_of_the_package(tmp_path: Path) -> None:
    """A wheel once lacked minipissa/sharded/ (its packages were listed by hand): build one from a copy of the
    checkout and compare its .py files with the source tree's."""
    pytest.importorskip("setuptools")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (tree / name).write_bytes((REPO / name).read_bytes())
    for rel in source_modules():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes((REPO / rel).read_bytes())
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("minipissa-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packed = {n for n in zf.namelist() if n.startswith("minipissa/") and n.endswith(".py")}
    assert packed == source_modules()


def test_the_suite_imports_the_installed_package() -> None:
    """In CI the package is installed from its wheel (not editable): the tests must exercise that copy, whose files
    are exactly the checkout's modules."""
    where = Path(minipissa.__file__).resolve().parent
    if where == SOURCE:
        if os.environ.get("CI"):
            pytest.fail(f"CI imported minipissa from the checkout ({where}), not from the installed wheel")
        pytest.skip("minipissa is imported from the checkout (an editable install)")
    installed = {f"minipissa/{p.relative_to(where).as_posix()}" for p in where.rglob("*.py")}
    assert installed == source_modules(), "the installed minipissa is not this checkout's: reinstall it"
    for rel in source_modules():
        assert (where.parent / rel).read_bytes() == (REPO / rel).read_bytes(), f"{rel} differs from the checkout"
