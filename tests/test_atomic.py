"""Atomic writes: what a killed writer leaves is removed by the next write of that output, and nothing a running
writer owns; outputs get the modes the umask makes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from detr_sparsity import atomic
from detr_sparsity.atomic import atomic_dir, atomic_path, write_json
from detr_sparsity.processes import HOST, PID_NAMESPACE, Writer, proc_stat, this_process
from tiny_project import REPO

# Writes a directory output and a file output beside it, says so, and waits to be killed.
KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from detr_sparsity.atomic import atomic_dir, atomic_path
    out = Path(sys.argv[1])
    with atomic_dir(out / "data") as tmp, atomic_path(out / "row.json") as row:
        (tmp / "images").mkdir()
        (tmp / "images" / "000001.jpg").write_bytes(b"x" * 1000)
        row.write_text("{")
        print("writing", flush=True)
        time.sleep(60)
""")


def killed_writer(out: Path) -> int:
    """Run KILLED_WRITER into `out` and SIGKILL it part way; returns its pid."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    return writer.pid


def temporaries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(".tmp")}


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    pid = killed_writer(tmp_path)
    left = temporaries(tmp_path)
    assert len(left) == 2 and all(f".{pid}-" in name and f"@{HOST}" in name for name in left), left
    assert not (tmp_path / "data").exists() and not (tmp_path / "row.json").exists()  # nothing looks complete

    # Beside them, temporaries that must stay: a running sibling's (a live process on this host), one from
    # another host (not checkable from here), another output's, and one whose name names no writer.
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        live = Writer(HOST, sibling.pid, proc_stat(sibling.pid)[1], PID_NAMESPACE)
        keep = {f".data.{live.token}.0000aaaa.tmp", f".data.{Writer('elsewhere.example.org', pid).token}.0000bbbb.tmp",
                f".data.json.{pid}@{HOST}.0000cccc.tmp", ".data.k3j9x1_q.tmp"}
        for name in keep:
            (tmp_path / name).mkdir()
        with atomic_dir(tmp_path / "data") as tmp:
            (tmp / "splits.json").write_text("{}")
        write_json(tmp_path / "row.json", {"AP": 0.5})
        assert temporaries(tmp_path) == keep
    finally:
        sibling.kill()
        sibling.wait(timeout=30)
    assert (tmp_path / "data" / "splits.json").read_text() == "{}"


def test_a_reused_pid_or_an_unreaped_process_is_gone_and_another_hosts_cannot_be_told():
    me = this_process()
    assert me.gone() is False
    assert Writer(HOST, os.getpid(), me.start + 1, me.namespace).gone() is True  # the same pid, started another time
    assert Writer("elsewhere.example.org", os.getpid(), me.start).gone() is None
    if PID_NAMESPACE is not None:  # a container on this host with its own process ids
        assert Writer(HOST, os.getpid(), me.start, PID_NAMESPACE + 1).gone() is None
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while proc_stat(zombie.pid)[0] != "Z" and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.01)
    assert Writer(HOST, zombie.pid).gone() is True
    zombie.wait()
    assert Writer(HOST, zombie.pid).gone() is True
    assert Writer.parse(me.token) == me and Writer.parse(Writer(HOST, 7).token) == Writer(HOST, 7)
    assert Writer.parse("k3j9x1_q") is None


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_outputs_get_the_modes_the_umask_makes(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        # safetensors writes its files 0600, as HF's save_pretrained (model.safetensors) and the gates do.
        with atomic_path(tmp_path / "gates.safetensors") as tmp:
            safetensors.numpy.save_file({"gate": np.zeros(2)}, str(tmp))
        write_json(tmp_path / "row.json", {"AP": 0.5})
        with atomic_dir(tmp_path / "model") as tmp:
            safetensors.numpy.save_file({"w": np.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "nested").mkdir(mode=0o700)
            write_json(tmp / "nested" / "info.json", {})
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(previous)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    file, directory = 0o666 & ~umask, 0o777 & ~umask
    files = ["gates.safetensors", "row.json", "model/model.safetensors", "model/nested/info.json"]
    assert {name: oct(mode(name)) for name in files} == {name: oct(file) for name in files}
    assert mode("model") == mode("model/nested") == directory
    assert mode("model/run.sh") == directory  # an executable stays one
