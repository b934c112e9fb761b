"""The tiny study submitted through the real SLURM profile to a single-node cluster on this machine
(workflow/profiles/slurm/local-cluster.sh): every job an sbatch job, COMPLETED in sacct with the memory, time and CPUs
it asked for, its runs on an `mlflow server`, and the same summary rows as a local run of the same study; then the
faults a cluster adds: a job cancelled mid-way (resumed by a rerun), a job over its memory, a GPU job on a node
without GPUs.

Marker `slurm`: left out of `make test` (pyproject's addopts) and run on its own line of `.ci/run`:

    python -m pytest -q -m slurm tests/test_slurm_cluster.py

It needs root and Debian's SLURM (`bash workflow/profiles/slurm/local-cluster.sh install`) and skips, saying why,
where SLURM is missing or the cluster does not start. A cluster it starts it stops; one already up it leaves up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from test_cluster_profiles import planned_jobs as planned_slurm_jobs
from test_orchestration import check_mlflow_server, check_summary, comparable
from test_orchestration import planned_jobs as planned_job_counts
from tiny_project import REPO, make_tiny_project, mlflow_server, run, tool_env, write_params

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "workflow/profiles/slurm/local-cluster.sh"
STATE = Path(os.environ.get("LOCAL_CLUSTER_DIR", "/tmp/detr-sparsity-slurm"))
ACCOUNT, PARTITION = "detr-sparsity", "debug"  # what the script creates (its defaults)

# No job asks for a GPU (the local node has none); every job asks for memory the stage fits in, with room for
# the two Snakemake processes each SLURM job runs (about 200 MB each), and its own time limit. The values differ
# per stage so that sacct shows that each job got its own stage's request.
RESOURCES = {"default": {"mem_mb": 2500, "runtime": 20, "gpu": 0},
             "model": {"mem_mb": 3000, "runtime": 30},
             "mgs_cache": {"mem_mb": 3000},
             "mgs_train": {"mem_mb": 2600, "runtime": 25},
             "benchmark": {"mem_mb": 4000, "runtime": 40}}


@dataclass
class Cluster:
    env: dict[str, str]  # SLURM_CONF and a PATH with the cluster's command wrappers first
    setup_seconds: float | None  # None: it was up already


def node_has_gpus() -> bool:
    conf = STATE / "etc/slurm.conf"
    return conf.is_file() and "Gres=gpu" in conf.read_text()


@pytest.fixture(scope="module")
def cluster():
    missing = [cmd for cmd in ("sbatch", "sacct", "slurmctld", "slurmd", "slurmdbd") if shutil.which(cmd) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found); as root: "
                    f"bash {SCRIPT.relative_to(REPO)} install")
    up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    setup = None
    if not up:
        began = time.monotonic()
        start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
        setup = time.monotonic() - began
        if start.returncode != 0:
            pytest.skip(f"the local SLURM cluster did not start: {(start.stderr or start.stdout).strip()}")
    try:
        yield Cluster(env={"SLURM_CONF": str(STATE / "etc/slurm.conf")}, setup_seconds=setup)
    finally:
        if not up:  # only what this module started
            stop = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True)
            status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
            assert status.returncode != 0, f"the cluster is still up after stop:\n{stop.stdout}{stop.stderr}"


def job_env(cluster: Cluster, root: Path, **extra: str) -> dict[str, str]:
    """The tools' environment for `root`: the cluster's commands on PATH (the SLURM plugin removes SLURM_CONF
    inside jobs; the wrappers set it again), the copy's own source first on PYTHONPATH (sbatch --export=ALL takes
    the environment to the jobs), and bytecode written, so that the copy's __pycache__ shows what the jobs imported."""
    return {**cluster.env, "PATH": f"{STATE / 'bin'}{os.pathsep}{tool_env(root)['PATH']}",
            "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": "", **extra}


SLURM_ARGS = ["--profile", "workflow/profiles/slurm",
              "--default-resources", f"slurm_account={ACCOUNT}", f"slurm_partition={PARTITION}",
              "--retries", "0",
              # the plugin's first status check otherwise waits 40 s
              "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "3"]


def snakemake_slurm(root: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["snakemake", *SLURM_ARGS, *args], root, check=check, env=env)


def submitted(output: str) -> dict[str, str]:
    """SLURM job id -> rule, of every job Snakemake submitted (its SLURM log is .snakemake/slurm_logs/rule_<rule>/)."""
    return {jobid: rule for jobid, rule in
            re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_([^/]+)/", output)}


def sacct(*args: str, env: dict[str, str]) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "State", "ReqMem", "TimelimitRaw", "AllocCPUS", "Account", "Partition"]
    out = subprocess.run(["sacct", "-X", "-P", "-n", f"--format={','.join(fields)}", *args],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def report(request, line: str) -> None:
    """A line on the terminal, whatever the capture (the timings of a run are what this test measures)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")


@pytest.fixture(scope="module")
def study(cluster, tmp_path_factory, request) -> dict:
    """The tiny study run once through the SLURM profile against an `mlflow server`, and once locally
    (`snakemake --cores 2`) in a second copy, one after the other; their wall times are reported."""
    tmp = tmp_path_factory.mktemp("slurm")
    root = make_tiny_project(tmp / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["resources"] = RESOURCES
    write_params(root, params)
    run(["git", "commit", "-q", "-am", "resources of the local cluster"], root)
    local = tmp / "local"
    shutil.copytree(root, local)

    planned = planned_slurm_jobs(root, "--profile", "workflow/profiles/slurm")  # each job's rule, threads, resources
    counts = {stage: int(n) for stage, n in planned_job_counts(root).items() if stage not in ("all", "total")}
    with mlflow_server(tmp / "mlflow") as url:
        env = job_env(cluster, root, MLFLOW_TRACKING_URI=url)
        began = datetime.now() - timedelta(minutes=1)
        clock = time.monotonic()
        slurm = snakemake_slurm(root, env)
        slurm_seconds = time.monotonic() - clock
        by_key = check_summary(root)
        check_mlflow_server(url, root, counts, by_key)

    clock = time.monotonic()
    run(["snakemake", "--cores", "2"], local, env=job_env(cluster, local))
    local_seconds = time.monotonic() - clock

    timings = {"cluster_setup_s": cluster.setup_seconds, "slurm_s": slurm_seconds, "local_s": local_seconds,
               "sbatch_jobs": len(submitted(slurm.stdout + slurm.stderr))}
    (tmp / "timings.json").write_text(json.dumps(timings, indent=1))
    setup = "up already" if cluster.setup_seconds is None else f"set up in {cluster.setup_seconds:.0f} s"
    report(request, f"local SLURM cluster {setup}; the tiny study {slurm_seconds:.0f} s through SLURM "
                    f"({timings['sbatch_jobs']} sbatch jobs), {local_seconds:.0f} s locally (--cores 2)")
    return {"root": root, "local": local, "env": env, "output": slurm.stdout + slurm.stderr, "began": began,
            "planned": planned, "counts": counts}


def test_every_job_is_an_sbatch_job_completed_with_its_resources(study):
    root, env = study["root"], study["env"]
    output = study["output"]
    jobs = submitted(output)
    # one sbatch job per planned job; `all` is a local rule
    assert Counter(jobs.values()) == Counter(job["rule"] for job in study["planned"])
    assert Counter(jobs.values()) == Counter(study["counts"])
    run_id = re.search(r"SLURM run ID: (\S+)", output)[1]
    accounted = {row["JobID"]: row for row in sacct("--name", run_id, "-S", study["began"].strftime("%Y-%m-%dT%H:%M:%S"),
                                                     env=env)}
    assert set(accounted) == set(jobs)  # sacct knows exactly these jobs under this run's name
    wanted = {job["rule"]: job for job in study["planned"]}
    for jobid, rule in jobs.items():
        row, job = accounted[jobid], wanted[rule]
        assert row["State"] == "COMPLETED", (rule, row)
        assert (row["Account"], row["Partition"]) == (ACCOUNT, PARTITION), (rule, row)
        assert row["ReqMem"] == f"{job['resources']['mem_mb']}M", (rule, row)
        assert int(row["TimelimitRaw"]) == job["resources"]["runtime"], (rule, row)  # minutes
        assert int(row["AllocCPUS"]) == job["threads"], (rule, row)
        assert not job["resources"].get("gpu"), rule
    # The jobs imported the copy's source (PYTHONPATH reached them): every stage module was compiled there, and only
    # the jobs import the stage modules (Snakemake itself reads the declaration).
    compiled = {p.name.split(".")[0] for p in (root / "src/detr_sparsity/stages/__pycache__").glob("*.pyc")}
    assert set(study["counts"]) <= compiled
    assert not (root / "mlflow.db").exists()  # every run went to the tracking server
    # Each in a process of its own: the job server serves local runs only.
    logs = list((root / "results/synthetic/logs").glob("*.log"))
    assert logs and not any("started by the job server" in log.read_text() for log in logs)


def test_the_rows_equal_those_of_a_local_run(study):
    slurm = json.loads((study["root"] / "results/synthetic/summary.json").read_text())
    local = json.loads((study["local"] / "results/synthetic/summary.json").read_text())
    # the local run's evaluations were started by its job server: the same rows as jobs in their own processes
    assert "started by the job server" in (study["local"] / "results/synthetic/logs/evaluate-dense.log").read_text()
    # check_summary (in the fixture) held the SLURM run's rows to the configured list; the local run has the same
    assert [(r["method"], r["setting"]) for r in slurm] == [(r["method"], r["setting"]) for r in local]
    for a, b in zip(slurm, local):
        assert comparable(a) == comparable(b), (a["method"], a["setting"])
        # and the detections behind them, byte for byte
        assert (study["root"] / a["detections"]).read_bytes() == (study["local"] / b["detections"]).read_bytes()


def faults_copy(study, tmp_path: Path) -> Path:
    """A copy of the finished SLURM project, so that a fault leaves the others' checks alone."""
    root = tmp_path / "project"
    shutil.copytree(study["root"], root, symlinks=True)
    return root


def test_a_job_over_its_memory_is_killed_and_named(study, tmp_path):
    root = faults_copy(study, tmp_path)
    env = {**study["env"], "PYTHONPATH": str(root / "src")}
    env.pop("MLFLOW_TRACKING_URI")  # the server is gone: the project's own SQLite store
    params = yaml.safe_load((root / "params.yaml").read_text())
    # Below what an evaluation needs (about 800 MB with the job's Snakemake), above what the batch step needs.
    params["studies"]["synthetic"]["resources"]["evaluate"] = {"mem_mb": 600}
    write_params(root, params)
    failed = snakemake_slurm(root, env, "--forcerun", "evaluate", "results/synthetic/evaluate/dense/row.json",
                             check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output
    (jobid,) = submitted(output)
    assert "Error in rule evaluate:" in output
    assert f"SLURM-job '{jobid}' failed" in output
    # the scheduler's words, in the job's SLURM log (OverMemoryKill: the step is killed, the job FAILED)
    (slurm_log,) = (root / ".snakemake/slurm_logs/rule_evaluate").rglob(f"{jobid}.log")
    assert "exceeded memory limit" in slurm_log.read_text()
    assert sacct("-j", jobid, env=env)[0]["State"] in ("FAILED", "OUT_OF_MEMORY")
    # and the workflow's note: the rule, its request, the setting to raise
    assert (f"NOTE: the job of rule evaluate was killed for using more memory than it requested (mem_mb=600; "
            f"read {slurm_log})") in output
    assert "Raise studies.synthetic.resources.evaluate.mem_mb in params.yaml" in output

    # As the note says: more memory for one run (targets before --set-resources, which takes several values).
    again = snakemake_slurm(root, env, "results/synthetic/evaluate/dense/row.json",
                            "--set-resources", "evaluate:mem_mb=1500")
    (jobid,) = submitted(again.stdout + again.stderr)
    (row,) = sacct("-j", jobid, env=env)
    assert (row["State"], row["ReqMem"]) == ("COMPLETED", "1500M")
    evaluated = json.loads((root / "results/synthetic/evaluate/dense/row.json").read_text())
    assert comparable(evaluated) == comparable(
        json.loads((study["root"] / "results/synthetic/evaluate/dense/row.json").read_text()))


def test_a_cancelled_gate_training_fails_and_a_rerun_resumes_it(study, tmp_path):
    root = faults_copy(study, tmp_path)
    env = {**study["env"], "PYTHONPATH": str(root / "src")}
    env.pop("MLFLOW_TRACKING_URI")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # About 100 steps/s here: long enough to be caught between checkpoints.
    steps = 5000
    params["studies"]["synthetic"]["mgs"]["training"].update(steps=steps, checkpoint_every=250)
    write_params(root, params)
    target = "results/synthetic/mgs/trained"  # every end-to-end objective's gates: distillation's here
    checkpoints = root / "results/synthetic/checkpoints"
    log = root / "results/synthetic/logs/mgs_train.log"
    assert not list(checkpoints.glob("*.pt"))  # the study's run left none
    out = tmp_path / "cancelled.log"
    with out.open("w") as sink:
        snakemake = subprocess.Popen(["snakemake", *SLURM_ARGS, target], cwd=root,
                                     env={**tool_env(root), **env, "PYTHONUNBUFFERED": "1"},
                                     stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not list(checkpoints.glob("mgs-distillation-0.5-*.pt")):
                assert snakemake.poll() is None, out.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 300 s:\n" + out.read_text()
                time.sleep(0.2)
            (jobid,) = submitted(out.read_text())
            subprocess.run(["scancel", jobid], env={**os.environ, **env}, check=True)
            snakemake.wait(timeout=300)
        finally:
            if snakemake.poll() is None:
                snakemake.kill()
    output = out.read_text()
    assert snakemake.returncode != 0, output
    # (squeue's state: the profile's status command; sacct's "CANCELLED by 0" would leave Snakemake waiting)
    assert "Error in rule mgs_train:" in output and f"SLURM-job '{jobid}' failed, SLURM status is: 'CANCELLED'" in output
    assert sacct("-j", jobid, env=env)[0]["State"].startswith("CANCELLED")
    assert not (root / target).exists()  # caught mid-way
    assert f"after {steps} steps" not in log.read_text()

    rerun = snakemake_slurm(root, env, target)
    (again,) = submitted(rerun.stdout + rerun.stderr)
    assert sacct("-j", again, env=env)[0]["State"] == "COMPLETED"
    resumed = re.search(r"resuming gate training from (\S+) at step (\d+)", log.read_text())
    assert resumed, log.read_text()
    assert 0 < int(resumed[2]) < steps and int(resumed[2]) % 250 == 0
    training = json.loads((root / target / "distillation.json").read_text())
    assert training["final"]["steps"] == steps
    assert not list(checkpoints.glob("mgs-distillation-0.5-*.pt"))  # removed once the gates are saved


def test_a_gpu_job_is_refused_on_a_node_without_gpus(cluster, tmp_path):
    """On this GPU-less node sbatch refuses a GPU request at submission; Snakemake reports the rule."""
    if node_has_gpus():
        pytest.skip("this node has GPUs: a GPU job is accepted here")
    root = make_tiny_project(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["resources"] = {"default": {"mem_mb": 1000, "runtime": 5, "gpu": 0},
                                                   "data": {"gpu": 1}}
    write_params(root, params)
    refused = snakemake_slurm(root, job_env(cluster, root), "results/synthetic/data", check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "sbatch: error: Invalid generic resource (gres) specification" in output
    assert not submitted(output)
