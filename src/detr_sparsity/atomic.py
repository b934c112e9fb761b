"""Atomic writes: an interrupted stage never leaves a half-written file that looks complete.

An output is written to a temporary beside it, `.<name>.<writer>.<random>.tmp`, and renamed onto it only when
complete; `<writer>` names the writing process (`<pid>-<start>@<host>%<PID namespace>`, processes.py). A process
killed part way (SIGKILL, a node lost) leaves its temporary behind: the next atomic write to the same output removes
the temporaries of that output's name whose writer is gone. A writer that still runs (a sibling job on this host) keeps
its own, and so does one on another host (or in another container's PID namespace) sharing the file system, whose
processes cannot be checked from here.

Outputs get the usual modes from the umask (0644 files, 0755 directories with umask 022), recursively for a
directory, whatever the library that wrote them chose (temporary files are created 0600, for one).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from detr_sparsity.processes import Writer, this_process

log = logging.getLogger(__name__)
SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (changing it races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_modes(root: Path) -> None:
    """Give `root` and everything under it the modes the umask makes (executables stay executable)."""
    mask = current_umask()
    pending = [root]
    while pending:
        path = pending.pop()
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            want = 0o777 & ~mask
            pending.extend(path.iterdir())
        elif stat.S_ISREG(info.st_mode):
            want = (0o777 if info.st_mode & 0o111 else 0o666) & ~mask
        else:
            continue  # links and the like keep theirs
        if stat.S_IMODE(info.st_mode) != want:
            path.chmod(want)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{this_process().token}.{secrets.token_hex(4)}{SUFFIX}"


def _writer_of(temporary: str, path: Path) -> Writer | None:
    """The writer named in `temporary` if it is a temporary of `path` (a name this module writes), else None."""
    prefix = f".{path.name}."
    if not (temporary.startswith(prefix) and temporary.endswith(SUFFIX)):
        return None
    token, _, _random = temporary[len(prefix):-len(SUFFIX)].rpartition(".")
    return Writer.parse(token)


# Temporary-looking names per directory, listed at the first write into it by this process: a directory of many
# outputs (thousands of images) is not listed again for each, and leftovers of killed runs predate this one.
_listed: dict[tuple[int, int], set[str]] = {}


def _temporaries_in(directory: Path) -> set[str]:
    info = directory.stat()
    key = (info.st_dev, info.st_ino)
    if key not in _listed:
        with os.scandir(directory) as entries:
            _listed[key] = {e.name for e in entries if e.name.startswith(".") and e.name.endswith(SUFFIX)}
    return _listed[key]


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `path` that writers now gone left beside it; returns what was removed."""
    path = Path(path)
    names = _temporaries_in(path.parent)
    removed = []
    for name in [n for n in names if n.startswith(f".{path.name}.")]:
        writer = _writer_of(name, path)
        if writer is None:
            continue  # another output's temporary (`.<name>.<suffix>...`), or one this module did not write
        leftover = path.parent / name
        gone = writer.gone()
        if gone is None:
            log.info("left %s in place: written by %s, which cannot be checked from here "
                     "(remove it once that job has ended)", leftover, writer)
        elif gone:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            log.info("removed %s, left by process %d on this host, which has ended", leftover, writer.pid)
            removed.append(leftover)
        else:
            continue  # its writer still runs, and may finish it
        names.discard(name)  # decided: not looked at again by this process
    return removed


def _create(path: Path, make) -> Path:
    """A fresh temporary for `path`, created by `make(temporary)` (the name is taken only if it was free)."""
    remove_leftovers(path)
    while True:
        tmp = _temporary(path)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create(path, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        yield tmp
        give_usual_modes(tmp)  # whatever the writer created it with (mkstemp, say: 0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (sorted keys, so equal content gives equal bytes)."""
    # json.dumps, not json.dump: dump always encodes in Python, dumps in C where indent is None (the detections
    # files: 3x faster), and both write the same text.
    text = json.dumps(obj, indent=indent, sort_keys=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create(path, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        give_usual_modes(tmp)  # HF writes model.safetensors 0600, for one
        if path.exists():
            # Renamed away before it is deleted: a kill part way leaves no half-deleted output that looks complete,
            # only a temporary that the next write removes.
            old = _temporary(path)
            os.rename(path, old)
            os.replace(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
