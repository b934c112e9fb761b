"""Which process wrote something, and whether it has ended: its host, process id and start.

Temporary outputs carry their writer in their name, MLflow runs in their tags, so that what a killed process left
behind (a half-written temporary, a run still marked RUNNING) is tidied by a later process without touching what a
sibling job that still runs is writing. A process is checked only on its own host (and in its own PID namespace,
where Linux says which: containers on one host may share a host name, not their process ids): one elsewhere,
sharing the file system or the tracking store, cannot be seen from here, so its leftovers are never taken for
abandoned.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

HOST = socket.gethostname()
_WRITER = re.compile(r"(\d+)(?:-(\d+))?@([^/@%]+)(?:%(\d+))?")


def _pid_namespace() -> int | None:
    """The inode of this process's PID namespace (Linux), None where unknown."""
    try:
        return int(os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]"))
    except (OSError, ValueError):
        return None


PID_NAMESPACE = _pid_namespace()


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
    """A process: its host, its id, and where the OS tells them its start (so a reused pid is not taken for it) and
    its PID namespace."""

    host: str
    pid: int
    start: int | None = None  # clock ticks since boot (Linux /proc); None where unknown
    namespace: int | None = None  # its PID namespace (Linux); None where unknown

    @property
    def token(self) -> str:
        """`<pid>-<start>@<host>%<namespace>` (the parts the OS tells), as written into temporary names."""
        start = "" if self.start is None else f"-{self.start}"
        namespace = "" if self.namespace is None else f"%{self.namespace}"
        return f"{self.pid}{start}@{self.host}{namespace}"

    @classmethod
    def parse(cls, token: str) -> Writer | None:
        match = _WRITER.fullmatch(token)
        if match is None:
            return None
        pid, start, host, namespace = match.groups()
        return cls(host, int(pid), *(None if part is None else int(part) for part in (start, namespace)))

    def __str__(self) -> str:
        elsewhere = self.namespace is not None and self.namespace != PID_NAMESPACE
        return f"process {self.pid} on host {self.host}" + (f" in PID namespace {self.namespace}" if elsewhere else "")

    @property
    def here(self) -> bool:
        """Whether its process can be checked from here: the same host, and the same PID namespace where known."""
        return self.host == HOST and (None in (self.namespace, PID_NAMESPACE) or self.namespace == PID_NAMESPACE)

    def gone(self) -> bool | None:
        """True when the process has ended (or its pid now names a later process), False while it runs, None when
        it cannot be told from here (it ran on another host, or in another PID namespace)."""
        if not self.here:
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
    return Writer(HOST, pid, None if stat is None else stat[1], PID_NAMESPACE)


def this_process() -> Writer:
    """The calling process (looked up again in a forked child, which has its own pid)."""
    return _writer(os.getpid())
