"""Pipeline jobs started from a process that has already imported torch, transformers and MLflow.

Every job of a study is a new process (`python -m detr_sparsity <stage> ...`), and before any work each one spent
about 4 s of a core importing the same libraries on an idle machine (benchmarks/job_startup.py), 5 to 6 in the
study's parallel phase: a quarter of the cores' time after pretraining in the default study (67 jobs). Under a
local Snakemake run a job server imports them once, and each job's command, a light client, asks it to fork a child
that runs the command as the job's own process would: the client's arguments, working directory, environment and standard streams; the project's own
modules imported afresh by the child; the child's exit status passed back to the client, which exits with it. The
child is an ordinary job otherwise: its own process id and start, MLflow run, log and CPU time.

- Threads: Snakemake sets OMP_NUM_THREADS for each job, but the server's OpenMP runtime read its variables once, at
  import. The child therefore sets torch's threads from the job's variable, as a process started with it would
  have them (evaluations on one thread, pretraining on every core).
- Where: the server is started by the Snakemake run it serves (the Snakefile's onstart, local execution only) and
  named to its jobs by one environment variable (SERVER_ENV). Cluster jobs (no server), `dvc repro`, tests and
  commands typed by hand run in their own process as before, and so does any job that cannot reach the server or
  that it refuses (another interpreter or module path): a job never fails for the server's sake before it starts.
- Signals: the client forwards SIGINT, SIGTERM and SIGHUP to the child (Ctrl-C, a cancelled job); a client that
  disappears without a word (SIGKILL) gets its child SIGTERMed. The server leaves with its Snakemake, taking its
  socket and its running children with it.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from detr_sparsity.processes import Writer

# "<socket path>": set by the Snakemake run that started the server, inherited by its local jobs. Set to OFF before
# `snakemake`, it keeps the run from starting one (every job in its own process).
SERVER_ENV = "DETR_SPARSITY_JOB_SERVER"
OFF = "off"
# Set in a child the server started: the job's log says so (cli.run_stage).
STARTED_BY_ENV = "DETR_SPARSITY_STARTED_BY_SERVER"
# What the server imports once: what every stage's process imports before its work, bar the project's own modules
# (the child imports those as a cold process does, from the files as they are). `transformers` resolves its model
# classes lazily: the attributes named here are loaded too.
PRELOADED = ("torch", "numpy", "scipy.optimize", "PIL.Image", "safetensors.torch", "pycocotools.coco",
             "pycocotools.cocoeval", "mlflow", "mlflow.tracking", "yaml", "jsonschema", "tqdm")
PRELOADED_ATTRIBUTES = {"transformers": ("DetrForObjectDetection", "DetrConfig", "DetrImageProcessorPil")}
# The job's variable that the preloaded OpenMP runtime read at import: the child applies it itself.
THREAD_ENV = "OMP_NUM_THREADS"
_HEADER = struct.Struct("!I")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How long a client tries to connect, and the server waits for a request's bytes.
_CONNECT_TIMEOUT = 10.0


# ---------------------------------------------------------------- the client: a job's command

def run_on_server(argv: list[str]) -> int | None:
    """Run this command (`sys.argv`) in a child of the job server named by SERVER_ENV and return its exit status;
    None where there is no server to run it (the caller then runs the command itself)."""
    path = os.environ.get(SERVER_ENV)
    if not path or path == OFF:
        return None
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "executable": sys.executable,
                          "path": sys.path}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(_CONNECT_TIMEOUT)
        conn.connect(path)
        conn.settimeout(None)
    except OSError:  # no server (not started yet, or gone): run here
        conn.close()
        return None
    # From here on the job may be running in a child: whatever happens, it is never run here as well.
    try:
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        replies = conn.makefile("rb")  # buffered: the child's pid and its status may come in one read
        reply = replies.readline().strip()
    except OSError as error:
        reply = str(error).encode()
    if reply.startswith(b"refused"):  # another interpreter or module path: nothing was started
        conn.close()
        return None
    if not reply.startswith(b"pid "):
        print(f"error: the job server ({path}) did not start this job: {reply.decode(errors='replace')!r}",
              file=sys.stderr)
        return 1
    child = int(reply.split()[1])

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    try:
        status = replies.readline().strip()
    except OSError:
        status = b""
    conn.close()
    if not status.startswith(b"status "):
        print(f"error: the job server ({path}) went away while running this job (process {child})",
              file=sys.stderr)
        return 1
    return int(status.split()[1])


# ---------------------------------------------------------------- the server

@dataclass(frozen=True)
class Server:
    """A job server that `start` started: its process, the socket it serves on, and its log."""
    process: subprocess.Popen
    socket: str
    log_file: Path

    def wait_serving(self, timeout: float) -> None:
        """Wait until the server listens on its socket (its imports done); RuntimeError, with its log, where it ends
        first or takes longer than `timeout` seconds. A Snakemake run does not wait: its first jobs run in their own
        process."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job server is not serving {self.socket}:\n{self.log_file.read_text()}")
            time.sleep(0.1)


def start(snakemake: Writer, log_file: Path) -> Server:
    """Start a server for the Snakemake process `snakemake` (`processes.this_process()` in the Snakefile) in the
    background, in a session of its own (Ctrl-C reaches the jobs' clients, which forward it), and name it to the jobs
    this process starts from now on (SERVER_ENV). Jobs that start before it is ready run in their own process."""
    path = os.path.join(tempfile.mkdtemp(prefix="detr-sparsity-jobs-"), "socket")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "detr_sparsity.job_server", path, snakemake.token],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    os.environ[SERVER_ENV] = path
    return Server(process, path, log_file)


def stop(server: Server) -> None:
    """Stop a server that `start` started (its running children too), once its Snakemake run is over."""
    os.environ.pop(SERVER_ENV, None)
    server.process.terminate()
    server.process.wait()
    # A server stopped while it still imported had no socket to remove: its folder goes here.
    shutil.rmtree(os.path.dirname(server.socket), ignore_errors=True)


def serve(path: str, snakemake: Writer) -> None:
    """Import PRELOADED, then start a child for each job that asks, until the process `snakemake` has ended."""
    started = time.perf_counter()
    for name in PRELOADED:
        importlib.import_module(name)
    for name, attributes in PRELOADED_ATTRIBUTES.items():
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
    gc.freeze()  # the preloaded objects, shared with every child: never scanned, so their pages stay shared
    print(f"job server {os.getpid()}: {len(sys.modules)} modules imported in {time.perf_counter() - started:.1f} s; "
          f"serving {path} for Snakemake {snakemake}", flush=True)

    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the loop below at once
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the Snakefile's stop: leave the loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listener")
    selector.register(wake_read, selectors.EVENT_READ, "wake")
    children: dict[int, socket.socket] = {}  # pid -> the connection of its client
    stopping = False
    try:
        while not stopping:
            for key, _ in selector.select(timeout=1.0):
                if key.data == "wake":
                    signals = wake_read.recv(64)
                    stopping = signal.SIGTERM in signals
                elif key.data == "listener":
                    conn, _ = listener.accept()
                    pid = _start_child(conn, listener, wake_read, wake_write, children)
                    if pid is not None:
                        children[pid] = conn
                        selector.register(conn, selectors.EVENT_READ, pid)
                else:  # a client that went away (its connection readable: closed) before its child ended
                    os.kill(key.data, signal.SIGTERM)
                    selector.unregister(key.fileobj)
            _reap(children, selector)
            if snakemake.gone():  # ended, a zombie, or its pid now another process's
                stopping = True
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        listener.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def _start_child(conn, listener, wake_read, wake_write, children) -> int | None:
    """Fork a child that runs the request read from `conn`; its pid, or None where the request is refused."""
    try:
        conn.settimeout(_CONNECT_TIMEOUT)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (size,) = _HEADER.unpack(header)
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("request cut short")
            data += chunk
        request = json.loads(data)
    except (OSError, ValueError, struct.error) as error:
        print(f"job server: a request failed: {error}", flush=True)
        conn.close()
        return None
    if request["executable"] != sys.executable or request["path"] != sys.path:
        conn.sendall(b"refused: another interpreter or module path\n")
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child: the job's process from here on
        code = 1
        try:
            for server_socket in (listener, wake_read, wake_write, conn, *children.values()):
                server_socket.close()
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = _run_job(request, fds)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    conn.sendall(f"pid {pid}\n".encode())
    return pid


def _run_job(request: dict, fds: list[int]) -> int:
    """In the child: become the job's process (its streams, directory, environment, arguments, threads), run its
    command as `python -m detr_sparsity` does, and return its exit status."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[STARTED_BY_ENV] = str(os.getppid())
    sys.argv = request["argv"]
    threads = os.environ.get(THREAD_ENV, "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    try:
        from detr_sparsity.cli import job

        code = job()
    except SystemExit as ended:  # as the interpreter ends on it: an int as is, None 0, a message printed and 1
        code = ended.code if isinstance(ended.code, int) else (0 if ended.code is None else 1)
        if isinstance(ended.code, str):
            print(ended.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    logging.shutdown()  # the exit handler of a process that ends normally: flush and close the log
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    """Send each ended child's exit status to its client (128 + N for a child killed by signal N, as a shell says)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            conn.sendall(f"status {128 - code if code < 0 else code}\n".encode())
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], Writer.parse(sys.argv[2]))
