"""Atomic writes: a file, or a directory of files, replaced whole or not at all, and the cleanup of what killed
writers leave behind.

A write goes where ``open(path, "w")`` would write: through a symbolic link (or a chain of them) to its target, which
a dangling link names too; the link stays. What is replaced keeps its permission bits; what is new gets the umask's,
as ``open`` and ``mkdir`` give them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..core.errors import PathLike, StateError, as_path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Our temporary files and directories, ``.minipissa-<target hash>-<pid>-<random>.tmp``, a fixed length, so that
#: any file name the file system takes can be saved (a name of 243 characters plus a suffix would pass 255
#: bytes); ``.old``: a directory moved aside while its replacement is renamed into place.
TEMP = re.compile(r"\.minipissa-([0-9a-f]{8})-(\d+)-[0-9a-f]{16}\.(tmp|old)")
#: A temporary file of ours this old is stale whatever its PID (the PID may belong to another host or be reused).
STALE_SECONDS = 24 * 3600


def _temp_name(target: Path, suffix: str = "tmp") -> Path:
    tag = hashlib.sha256(target.name.encode()).hexdigest()[:8]
    return target.parent / f".minipissa-{tag}-{os.getpid()}-{secrets.token_hex(8)}.{suffix}"


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


#: How many symbolic links one path may chain, as Linux's own lookup allows (MAXSYMLINKS).
MAX_LINKS = 40


def final_path(path: Path) -> Path:
    """``path``, or, where it is a symbolic link, the path it finally points to (through a chain of links; it may
    not exist: a dangling link names the file to create). Writing there leaves the links in place."""
    given = path
    for _ in range(MAX_LINKS):
        if not path.is_symlink():
            return path
        link = Path(os.readlink(path))
        path = link if link.is_absolute() else path.parent / link  # relative to the link's own directory
    raise StateError(f"minipissa: '{given}': more than {MAX_LINKS} symbolic links in a row (a loop?); give a path")


def write_target(path: PathLike, kind: str) -> Path:
    """Where a write of a ``kind`` ("file" or "directory") to ``path`` goes (:func:`final_path`), checked: its
    directory exists (a file; a link's target; a new directory's parents are made); no file in the way of a
    directory, nor a directory in the way of a file."""
    given = as_path(path)
    target = final_path(given)
    where = f"'{given}'" if target == given else f"'{given}' (a symbolic link to '{target}')"
    if kind == "file" and target.is_dir():
        raise StateError(f"minipissa: {where} is a directory; give a file path, e.g. '{given}/adapter.safetensors'")
    if kind == "directory" and target.exists() and not target.is_dir():
        raise StateError(f"minipissa: {where} exists and is not a directory; give a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if (kind == "file" or target != given) and not directory.is_dir():
        raise StateError(f"minipissa: the directory '{directory}' of {where} does not exist; create it first")
    if kind == "directory":
        _refuse_cwd(target, where)
    return target


def _refuse_cwd(target: Path, where: str) -> None:
    """A directory is replaced by renaming a new one into its place: not the one this process works in, nor one
    above it (renaming it would move the working directory along; "." cannot be renamed at all)."""
    try:
        cwd = Path(os.getcwd())
    except OSError:  # the working directory was removed: nothing to protect
        return
    real = Path(os.path.realpath(target))
    if real == cwd or real in cwd.parents:
        which = "the current directory" if real == cwd else f"a directory above the current one ('{cwd}')"
        raise StateError(
            f"minipissa: {where} is {which}, which cannot be replaced whole (a new directory is written beside "
            "it and renamed into its place); give a directory of its own, e.g. 'lora_adapter'"
        )


def _mode(path: Path | str) -> int | None:
    """The permission bits of the file or directory at ``path``; None where there is none."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # none there (or a dangling link): a new file's mode
        return None


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(temp_path)`` on a temporary file next to ``path`` (:func:`final_path`), fsync it, then rename
    it over ``path``, with the replaced file's permissions (a new file: the umask's).

    If ``write`` fails (or the process dies) the previous file at ``path`` is untouched. Temporary files that
    killed writers left in that directory are removed first (those whose process is gone, or a day old).
    """
    target = write_target(path, "file")
    directory = target.parent if str(target.parent) else Path(".")
    remove_stale_temps(directory)
    temp = str(_temp_name(directory / target.name))
    open(temp, "xb").close()
    # The replaced file's mode, else the umask's usual one (safetensors and mkstemp would leave 0600).
    existing = _mode(target)
    mode = stat.S_IMODE(os.stat(temp).st_mode) if existing is None else existing
    try:
        write(temp)
        os.chmod(temp, mode)
        _fsync(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def atomic_write_dir(path: PathLike, files: Mapping[str, Callable[[str], None]]) -> None:
    """Write ``files`` ({name: write(temp_path)}) into the directory ``path`` so that a reader sees all the old
    files or all the new ones, never a mix: they are written into a temporary directory beside it, which is
    renamed into place. Other files already in ``path`` are kept (hard-linked, or copied, into the new one); the
    directory and the files replaced keep their permissions. ``path`` may be a link (:func:`final_path`), not the
    working directory or one above it."""
    out = write_target(path, "directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    _restore_aside(out)
    temp = _temp_name(out)
    temp.mkdir()
    try:
        for name, write in files.items():
            write(str(temp / name))
            mode = _mode(out / name)
            if mode is not None:
                os.chmod(temp / name, mode)
            _fsync(str(temp / name))
        if not out.exists():
            os.rename(temp, out)
        else:
            for entry in os.scandir(out):
                if entry.name in files:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.copytree(entry.path, temp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry.path, str(temp / entry.name))
            os.chmod(temp, stat.S_IMODE(os.stat(out).st_mode))  # last: a read-only mode would stop the copies
            aside = _temp_name(out, "old")
            os.rename(out, aside)  # from here to the next rename a crash leaves the old files in `aside`
            os.rename(temp, out)  # (put back by the next write to `path`, see _restore_aside)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _restore_aside(out: Path) -> None:
    """Put back a directory moved aside by an :func:`atomic_write_dir` that was killed before it finished."""
    if out.exists():
        return
    tag = hashlib.sha256(out.name.encode()).hexdigest()[:8]
    for entry in os.scandir(out.parent):
        match = TEMP.fullmatch(entry.name)
        if match and match.group(1) == tag and match.group(3) == "old" and not _alive(int(match.group(2))):
            os.rename(entry.path, out)
            return


def remove_stale_temps(directory: Path) -> None:
    """Delete our temporary files and directories in ``directory`` whose writer is dead on this host, or that are a
    day old (never a directory moved aside, which holds the previous files: see :func:`_restore_aside`)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = TEMP.fullmatch(entry.name)
            if match is None or match.group(3) != "tmp":
                continue
            with contextlib.suppress(OSError):
                if not _alive(int(match.group(2))) or time.time() - entry.stat().st_mtime > STALE_SECONDS:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or an odd PID): not ours to judge
    return True
