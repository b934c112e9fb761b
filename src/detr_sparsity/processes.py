"""Which process wrote something, and whether it has ended: its host, process id and start.

Temporary outputs carry their writer in their name, MLflow runs in their tags, so that what a killed process left
behind (a half-written temporary, a run still marked RUNNING) is tidied by a later process without touching what a
sibling job that still runs is writing. A process is checked only on its own host: one on another host sharing
the file system or the tracking store cannot be seen from here, so its leftovers are never taken for abandoned.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

HOST = socket.gethostname()
_WRITER = re.compile(r"(\d+)(?:-(\d+))?@([^/@]+)")


def proc_stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start (clock ticks since boot) of process `pid` from /proc (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # the command name before ")" may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Writer:
    """A process: its host, its id, and its start where the OS tells it (so a reused pid is not taken for it)."""

    host: str
    pid: int
    start: int | None = None  # clock ticks since boot (Linux /proc); None where unknown

    @property
    def token(self) -> str:
        """`<pid>-<start>@<host>` (or `<pid>@<host>`), as written into temporary names."""
        return f"{self.pid}{'' if self.start is None else f'-{self.start}'}@{self.host}"

    @classmethod
    def parse(cls, token: str) -> Writer | None:
        match = _WRITER.fullmatch(token)
        if match is None:
            return None
        pid, start, host = match.groups()
        return cls(host, int(pid), None if start is None else int(start))

    def gone(self) -> bool | None:
        """True when the process has ended (or its pid now names a later process), False while it runs, None when
        it cannot be told from here (it ran on another host)."""
        if self.host != HOST:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, under another user
        stat = proc_stat(self.pid)
        if stat is None:
            return False  # it exists, and nothing more can be read about it
        state, start = stat
        # A killed process that its parent has not reaped yet is a zombie: it runs no more.
        return state in ("Z", "X") or (self.start is not None and start != self.start)


@lru_cache(maxsize=4)
def _writer(pid: int) -> Writer:
    stat = proc_stat(pid)
    return Writer(HOST, pid, None if stat is None else stat[1])


def this_process() -> Writer:
    """The calling process (looked up again in a forked child, which has its own pid)."""
    return _writer(os.getpid())
