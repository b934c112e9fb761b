"""The job server (job_server.py): a job it starts computes what the same job computes in its own process, with the
job's own threads, streams and exit status; signals reach it through its client; anything that keeps the server from
running a job runs it in its own process; the server leaves with the Snakemake process it serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_project import tiny_study

from detr_sparsity import job_server
from detr_sparsity.processes import HOST, Writer, this_process
from detr_sparsity.tracking import logged_run_id, runs_by_id

STARTED = "started by the job server"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    yield from tiny_study(tmp_path_factory.mktemp("job-server"))


# The server's own OpenMP threads, read at its import: neither of the jobs' below.
SERVER_THREADS = "3"


def start_server(cwd: Path, serving: Writer) -> job_server.Server:
    """A server for process `serving`, started from `cwd` (its jobs' working directory, as Snakemake's) with
    OMP_NUM_THREADS=SERVER_THREADS, once it is serving; its socket is named to this process's jobs no longer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("OMP_NUM_THREADS", SERVER_THREADS)
        server = job_server.start(serving, cwd / "job_server.log")
    assert os.environ.pop(job_server.SERVER_ENV) == server.socket
    server.wait_serving(timeout=120)
    return server


@pytest.fixture(scope="module")
def server(study):
    _, work = study
    started = start_server(work, this_process())
    yield started.socket
    job_server.stop(started)
    assert not os.path.exists(started.socket)


def job(work: Path, arguments: list[str], server: str | None, threads: int = 1, **popen) -> subprocess.Popen:
    """A job's command as Snakemake starts it: `python -m detr_sparsity ...` in the project root, OMP_NUM_THREADS set,
    the server named where there is one."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if server is not None:
        env[job_server.SERVER_ENV] = server
    return subprocess.Popen([sys.executable, "-m", "detr_sparsity", *arguments], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def evaluate_dense(work: Path, name: str) -> list[str]:
    out = work / "results/synthetic" / name
    return ["--log", str(out / "job.log"), "evaluate", "--method", "dense", "--model", "results/synthetic/model",
            "--data", "results/synthetic/data", "--detections", str(out / "detections.json"), "--row",
            str(out / "row.json")]


def without_run(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in ("mlflow_run_id", "detections")}


def test_a_job_it_starts_computes_what_its_own_process_computes(study, server):
    _, work = study
    for name, via in (("own-process", None), ("job-server", server)):
        done = job(work, evaluate_dense(work, name), via)
        assert done.wait() == 0, done.stderr.read()
    out = work / "results/synthetic"
    own, served = (out / "own-process/job.log").read_text(), (out / "job-server/job.log").read_text()
    assert STARTED in served and STARTED not in own
    assert (out / "job-server/detections.json").read_bytes() == (out / "own-process/detections.json").read_bytes()
    rows = [json.loads((out / name / "row.json").read_text()) for name in ("own-process", "job-server")]
    assert without_run(rows[0]) == without_run(rows[1])
    # Each its own process and run, on the job's one thread (not the server's SERVER_THREADS).
    assert rows[0]["mlflow_run_id"] != rows[1]["mlflow_run_id"]
    assert "1 thread(s)" in served and "1 thread(s)" in own
    run = runs_by_id([logged_run_id(served)])[logged_run_id(served)]
    assert run.status == "FINISHED" and run.metrics["threads"] == 1
    server_pid = int(served.split(f"{STARTED} (process ")[1].split(")")[0])
    assert int(run.tags["pid"]) not in (os.getpid(), server_pid)


def test_the_jobs_threads_streams_and_exit_status_are_its_own(study, server):
    _, work = study
    refused = job(work, ["masking", "--method", "bogus"], server)
    out, err = refused.communicate()
    assert refused.returncode == 2 and "'bogus' is not allowed" in err and out == ""
    two = job(work, evaluate_dense(work, "two-threads"), server, threads=2)
    assert two.wait() == 0, two.stderr.read()
    assert "2 thread(s)" in (work / "results/synthetic/two-threads/job.log").read_text()


def test_what_the_server_cannot_run_runs_in_its_own_process(study, server):
    _, work = study
    # No server at that path; another module path (the server would import other code); the server turned off: all
    # run here.
    for name, via, extra in (("no-server", str(work / "nothing-here"), {}),
                             ("other-path", server, {"PYTHONPATH": str(work)}), ("off", job_server.OFF, {})):
        env = {**os.environ, "OMP_NUM_THREADS": "1", job_server.SERVER_ENV: via, **extra}
        done = subprocess.run([sys.executable, "-m", "detr_sparsity", *evaluate_dense(work, name)], cwd=work,
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        log = (work / "results/synthetic" / name / "job.log").read_text()
        assert STARTED not in log and "cost:" in log


def long_pretraining(work: Path, name: str) -> list[str]:
    """The model stage with far more steps than a test waits for: a job that runs until it is stopped."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["studies"]["synthetic"]["model"]["pretrain"]["steps"] = 10**6
    (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
    out = work / "results" / name
    return ["--params", f"{name}.yaml", "--log", str(out / "job.log"), "model", "--data", "results/synthetic/data",
            "--out", str(out / "model")]


def wait_for_run(log: Path) -> str:
    deadline = time.monotonic() + 120
    while not (log.exists() and logged_run_id(log.read_text())):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return logged_run_id(log.read_text())


@pytest.mark.parametrize("how", ["SIGTERM to the job", "SIGKILL to the job's client"])
def test_a_stopped_job_stops_its_child_and_records_its_run_failed(study, server, how):
    _, work = study
    name = "stopped-" + how.split()[0].lower()
    client = job(work, long_pretraining(work, name), server)
    log = work / "results" / name / "job.log"
    run_id = wait_for_run(log)
    assert STARTED in log.read_text()
    client.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGKILL)
    client.wait(timeout=60)
    if how.startswith("SIGTERM"):  # forwarded: the job's own exit status, as a cancelled cluster job's
        assert client.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 60
    while runs_by_id([run_id])[run_id].status == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert runs_by_id([run_id])[run_id].status == "FAILED"
    assert "Terminated: terminated by SIGTERM" in log.read_text()


def test_the_server_leaves_with_its_snakemake(study):
    _, work = study
    snakemake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    server = start_server(work, Writer(HOST, snakemake.pid))
    snakemake.kill()
    snakemake.wait()
    server.process.wait(timeout=30)
    assert not os.path.exists(server.socket) and not os.path.exists(os.path.dirname(server.socket))
