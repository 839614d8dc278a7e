"""Where the writers write: through symbolic links to their targets (the links stay), with the permissions of what
they replace, never over the working directory or one above it; every refusal leaves the files as they were.
(What killed, failing or racing writers leave: tests/io/test_safefile.py.)"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import seams
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.interop.cli import main
from minipissa.io.atomic import final_path


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))


def adapted(seed: int = 0) -> nn.Module:
    """The adapter on base(), its B moved by ``seed`` (0: at its init), as training would."""
    model = minipissa.apply(base(), 4, ["0", "2"])
    if seed:
        with torch.no_grad():
            for _, layer in minipissa.pissa_layers(model):
                layer.B.add_(torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(seed)))
    return model


#: The file writers (save, save_residual) and what reads their file back.
FILE_WRITERS: dict[str, tuple[Callable[[nn.Module, Path], None], Callable[[Path], object]]] = {
    "save": (minipissa.save, lambda p: minipissa.load(base(), p)),
    "save_residual": (minipissa.save_residual, lambda p: minipissa.load_residual(base(), p)),
}
file_writers = pytest.mark.parametrize("writer", list(FILE_WRITERS))


def files_of(root: Path) -> dict[str, tuple[str, object, int]]:
    """Every entry under ``root``, links not followed: (kind, link target or bytes, permission bits)."""
    out: dict[str, tuple[str, object, int]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", os.readlink(path), 0)
        elif path.is_dir():
            out[str(path.relative_to(root))] = ("dir", None, stat.S_IMODE(info.st_mode))
        else:
            out[str(path.relative_to(root))] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return out


@given(
    hops=st.lists(st.tuples(st.booleans(), st.integers(0, 2)), max_size=5),
    exists=st.booleans(),
)
def test_final_path_is_where_the_os_resolves_the_link(hops: list[tuple[bool, int]], exists: bool) -> None:
    """A chain of links, each absolute or relative, each in one of three directories, ending at a file or at
    nothing: final_path is no link, and is where the OS's own resolution (realpath) ends."""
    with tempfile.TemporaryDirectory() as root:
        dirs = [Path(root) / d for d in ("a", "b", "a/c")]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        end = dirs[len(hops) % 3] / "end"
        if exists:
            end.write_text("x")
        for i, (absolute, where) in enumerate(hops):
            link = dirs[where] / f"link{i}"
            link.symlink_to(end if absolute else os.path.relpath(end, link.parent))
            end = link
        final = final_path(end)
        assert not final.is_symlink() and final.exists() == exists
        assert os.path.realpath(final) == os.path.realpath(end)


@pytest.fixture
def umask() -> Iterator[int]:
    """A umask that no default matches by chance: new files 0640, new directories 0750."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@file_writers
def test_a_file_is_written_through_links_and_chains_of_them(writer: str, tmp_path: Path) -> None:
    """A link to a file, a chain (relative and absolute links), a dangling link: the final target is written,
    every link stays a link."""
    write, read = FILE_WRITERS[writer]
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "a.safetensors"
    write(adapted(1), target)
    (tmp_path / "one").symlink_to(target)  # absolute
    (tmp_path / "two").symlink_to("one")  # relative, to a link
    (tmp_path / "three").symlink_to(tmp_path / "two")
    (tmp_path / "dangling").symlink_to("real/new.safetensors")
    links = {"one": target, "three": target, "dangling": tmp_path / "real" / "new.safetensors"}
    for seed, (link, final) in enumerate(links.items(), start=2):
        write(adapted(seed), tmp_path / link)
        write(adapted(seed), tmp_path / "plain.safetensors")
        assert (tmp_path / link).is_symlink() and not final.is_symlink(), link
        assert final.read_bytes() == (tmp_path / "plain.safetensors").read_bytes(), link
        read(tmp_path / link)
    assert [p.name for p in tmp_path.rglob(".minipissa*")] == []


@file_writers
def test_a_rewritten_file_keeps_its_mode_and_a_new_one_follows_the_umask(
    writer: str, tmp_path: Path, umask: int
) -> None:
    write, _ = FILE_WRITERS[writer]
    path = tmp_path / "a.safetensors"
    write(adapted(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    for mode in (0o600, 0o644, 0o400):
        path.chmod(mode)
        write(adapted(), path)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    (tmp_path / "link").symlink_to(path)
    path.chmod(0o600)
    write(adapted(), tmp_path / "link")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the target's mode, not the link's


def test_file_paths_refused_leave_the_files_as_they_were(tmp_path: Path) -> None:
    """A dangling link into a missing directory, a loop of links, a link to a directory: a named error."""
    (tmp_path / "into_nothing").symlink_to("missing/a.safetensors")
    (tmp_path / "loop_a").symlink_to("loop_b")
    (tmp_path / "loop_b").symlink_to("loop_a")
    (tmp_path / "d").mkdir()
    (tmp_path / "to_dir").symlink_to("d")
    before = files_of(tmp_path)
    for name, message in (
        ("into_nothing", r"directory '.*missing' of '.*into_nothing' \(a symbolic link to '.*missing/a.safetensors"),
        ("loop_a", "more than 40 symbolic links in a row"),
        ("to_dir", r"'.*to_dir' \(a symbolic link to '.*d'\) is a directory"),
    ):
        for write, _ in FILE_WRITERS.values():
            with pytest.raises(StateError, match=message):
                write(adapted(), tmp_path / name)
    assert files_of(tmp_path) == before


def test_a_directory_is_written_through_links_and_chains_of_them(tmp_path: Path) -> None:
    """convert_to_lora onto a link to a directory, a chain, a dangling link: the target directory is written,
    the user's other files in it are kept, every link stays."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "notes.txt").write_text("mine")
    (tmp_path / "one").symlink_to(tmp_path / "real")
    (tmp_path / "two").symlink_to("one")
    (tmp_path / "new_link").symlink_to("fresh")  # dangling: the directory is made there
    minipissa.convert_to_lora(adapted(), tmp_path / "expected")
    expected = files_of(tmp_path / "expected")
    for link, final in (("one", "real"), ("two", "real"), ("new_link", "fresh")):
        minipissa.convert_to_lora(adapted(), tmp_path / link)
        assert (tmp_path / link).is_symlink() and not (tmp_path / final).is_symlink(), link
        got = files_of(tmp_path / final)
        assert {k: v[1] for k, v in got.items() if k in expected} == {k: v[1] for k, v in expected.items()}, link
    assert (tmp_path / "real" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.rglob(".minipissa*")] == []


def test_a_rewritten_directory_keeps_its_modes_and_a_new_one_follows_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "lora"
    minipissa.convert_to_lora(adapted(), out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "adapter_config.json").stat().st_mode) == 0o666 & ~umask
    out.chmod(0o700)
    (out / "adapter_config.json").chmod(0o600)
    (out / "README.md").unlink()  # a file the conversion adds anew: the umask's mode
    minipissa.convert_to_lora(adapted(1), out)
    modes = {k: v[2] for k, v in files_of(tmp_path).items()}
    assert modes == {"lora": 0o700, "lora/adapter_config.json": 0o600, "lora/README.md": 0o640,
                     "lora/adapter_model.safetensors": 0o640}  # fmt: skip
    out.chmod(0o500)  # read-only: the copies into the new directory come first, its mode last
    minipissa.convert_to_lora(adapted(), out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o500


@pytest.fixture
def in_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: tmp_path/top/work, holding a file of the user's."""
    work = tmp_path / "top" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (tmp_path / "to_work").symlink_to(work)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(
    "where", [".", "cwd", "..", "parent", "to_work", "dangling_to_missing"], ids=lambda w: w.replace(".", "dot")
)
def test_directory_paths_refused_leave_the_files_as_they_were(where: str, in_work: Path) -> None:
    """The working directory (".", absolute, through a link) and the directories above it cannot be replaced whole;
    a dangling link whose target's directory is missing; a file in the way. Named errors, nothing changed."""
    root = in_work.parents[1]
    (root / "dangling_to_missing").symlink_to("missing/lora")
    minipissa.save(adapted(), root / "a.safetensors")
    out = {"cwd": in_work, "parent": in_work.parent, "to_work": root / "to_work"}.get(where, root / where)
    if where in (".", ".."):
        out = Path(where)
    message = {
        "..": "a directory above the current one",
        "parent": "a directory above the current one",
        "dangling_to_missing": "the directory '.*missing' of .* does not exist",
    }.get(where, "is the current directory")
    before = files_of(root)
    with pytest.raises(StateError, match=message):
        minipissa.convert_to_lora(adapted(), out)
    assert files_of(root) == before
    assert main(["convert", str(root / "a.safetensors"), str(out)]) == 2  # the command line: a message, status 2
    assert files_of(root) == before


def test_the_command_line_writes_through_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    minipissa.save(adapted(), tmp_path / "a.safetensors")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "adapter_config.json").is_file()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["convert", str(tmp_path / "a.safetensors"), "."]) == 2
    assert "is the current directory" in capsys.readouterr().err
    assert list((tmp_path / "here").iterdir()) == []


def test_convert_refuses_its_output_directory_before_any_work(in_work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted()

    def no_work(*args: object) -> None:
        raise AssertionError("the factors were computed for a directory that cannot be written")

    seams.replace(monkeypatch, "LoRA factors", no_work)
    with pytest.raises(StateError, match="is the current directory"):
        minipissa.convert_to_lora(model, ".")
