"""MLflow tracking: stage runs carry their tags and params, parallel stages lose no run (on a fresh store too),
a killed stage's run is marked FAILED once its process is gone and loses only its last seconds of metrics, and a
stage that fails or is interrupted is recorded FAILED."""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from detr_sparsity import cli, tracking
from detr_sparsity.config import load_config
from detr_sparsity.pipeline import stage_params
from detr_sparsity.processes import HOST, this_process
from tiny_project import REPO


@pytest.fixture(scope="module")
def initialised_store(tmp_path_factory):
    """A store with its schema and the study's experiment, made once: migrating a fresh one takes seconds."""
    database = tmp_path_factory.mktemp("initialised") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
        tracking.init_store(load_config(REPO / "params.yaml"))
    return database


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def store(fresh_store, tmp_path, initialised_store):
    """A store as `init_tracking` leaves it (a copy of one made once)."""
    shutil.copy(initialised_store, tmp_path / "mlflow.db")
    return fresh_store


_start = None


def _hold_start(barrier) -> None:
    global _start
    _start = barrier


def _one_stage_run(uri: str, index: int, together: bool = False) -> str:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = load_config(REPO / "params.yaml")
    if together:  # every process opens the store at the same moment
        _start.wait(timeout=240)
    with tracking.stage_run(cfg, "evaluate", stage_params(cfg, "evaluate"), setting={"job": index}) as run:
        for step in range(20):
            run.log_metrics({"value": step * index}, step=step)
        run.log_metrics({"final": float(index)})
    return run.run_id


def test_stage_run_records_tags_params_and_metrics(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)
    with tracking.stage_run(cfg, "model", stage_params(cfg, "model")) as run:
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
    got = MlflowClient(store).get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["stage"] == "model" and got.data.tags["study"] == "synthetic"
    assert got.data.tags["params_hash"] == tracking.params_hash(stage_params(cfg, "model"))
    assert got.data.params["model.architecture.d_model"] == "128"
    history = MlflowClient(store).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_run_name_says_stage_and_setting(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)
    with tracking.stage_run(cfg, "mgs_calibrate", stage_params(cfg, "mgs_calibrate"), setting={"objective": "task", "target": 0.9}) as swept:
        pass
    with tracking.stage_run(cfg, "profile", stage_params(cfg, "profile")) as single:
        pass
    client = MlflowClient(store)
    swept, single = client.get_run(swept.run_id), client.get_run(single.run_id)
    assert swept.info.run_name == "mgs_calibrate objective=task target=0.9"
    assert swept.data.tags["setting"] == "objective=task target=0.9"
    assert swept.data.tags["setting.objective"] == "task" and swept.data.tags["setting.target"] == "0.9"
    assert single.info.run_name == "profile" and "setting" not in single.data.tags
    # The setting tags make a sweep's runs filterable by one value.
    found = client.search_runs([swept.info.experiment_id], "tags.`setting.target` = '0.9'")
    assert [r.info.run_id for r in found] == [swept.info.run_id]


def test_failed_stage_is_marked_failed(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "data", stage_params(cfg, "data")) as run:
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run.run_id).info.status == "FAILED"


def test_parallel_stage_runs_all_land_on_a_fresh_store_and_after(fresh_store):
    """8 stages opening a fresh SQLite store at once (no `init_tracking` first, as when stages are started by hand
    or by an orchestrator other than Snakemake), then 8 more on the store now initialised."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(8)
    with context.Pool(8, initializer=_hold_start, initargs=(barrier,)) as pool:
        fresh = pool.starmap(_one_stage_run, [(fresh_store, i, True) for i in range(8)])
        after = pool.starmap(_one_stage_run, [(fresh_store, i) for i in range(8)])
    client = MlflowClient(fresh_store)
    for run_ids in (fresh, after):
        runs = [client.get_run(r) for r in run_ids]
        assert len(set(run_ids)) == 8
        assert all(r.info.status == "FINISHED" for r in runs)
        assert sorted(r.data.metrics["final"] for r in runs) == [float(i) for i in range(8)]
        assert all(len(client.get_metric_history(r.info.run_id, "value")) == 20 for r in runs)
    assert len(client.search_experiments()) == 2  # MLflow's Default and the study's, created once


# A stage that logs a loss every 50 ms until it is killed.
KILLED_STAGE = textwrap.dedent("""
    import sys, time
    from detr_sparsity import tracking
    from detr_sparsity.config import load_config
    from detr_sparsity.pipeline import stage_params
    cfg = load_config(sys.argv[1])
    setting = {"objective": "task", "target": 0.9}
    with tracking.stage_run(cfg, "mgs_calibrate", stage_params(cfg, "mgs_calibrate"), setting) as run:
        print(run.run_id, flush=True)
        for step in range(100000):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            time.sleep(0.05)
""")


def test_a_killed_stage_loses_only_its_last_seconds_and_its_next_run_marks_it_failed(store):
    cfg = load_config(REPO / "params.yaml")
    stage = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(REPO / "params.yaml")], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        run_id = stage.stdout.readline().strip()
        time.sleep(1.5 * tracking.FLUSH_SECONDS + 0.5)
    finally:
        killed_at = time.time() * 1000
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
    client = MlflowClient(store)
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"
    tags = killed.data.tags
    assert (tags["host"], tags["pid"]) == (HOST, str(stage.pid)) and tags["started"].endswith("Z")
    history = client.get_metric_history(run_id, "loss")
    assert history, "no step metric reached the store"
    last = max(m.timestamp for m in history)
    assert killed_at - last <= (tracking.FLUSH_SECONDS + 1) * 1000  # at most the last seconds are lost

    # The next run of another setting leaves it alone; the next run of the same setting marks it FAILED.
    with tracking.stage_run(cfg, "mgs_calibrate", stage_params(cfg, "mgs_calibrate"), {"objective": "task", "target": 0.5}):
        pass
    assert client.get_run(run_id).info.status == "RUNNING"
    with tracking.stage_run(cfg, "mgs_calibrate", stage_params(cfg, "mgs_calibrate"), {"objective": "task", "target": 0.9}):
        pass
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.info.end_time == last  # it ended at its last sign of life
    assert failed.data.tags["failure"].startswith(f"abandoned: process {stage.pid} on host {HOST} had ended")


def test_tidy_tracking_fails_only_runs_whose_process_is_gone(store, capsys):
    """A dead process's run is marked FAILED; a running one's (a sibling job: here this test) and another host's
    are left RUNNING, the latter until told that host's jobs are over."""
    cfg = load_config(REPO / "params.yaml")
    client, experiment = tracking.open_store(cfg)
    ended = subprocess.Popen(["true"])
    ended.wait()
    me = this_process()
    holders = {"dead": {"host": HOST, "pid": str(ended.pid)},
               "live": {"host": HOST, "pid": str(me.pid), "process_start": str(me.start)},
               "remote": {"host": "elsewhere.example.org", "pid": "4242"},
               "untagged": {}}
    runs = {name: client.create_run(experiment, tags={"stage": "evaluate", **tags}, run_name=name).info.run_id
            for name, tags in holders.items()}

    def statuses() -> dict[str, str]:
        return {name: client.get_run(run_id).info.status for name, run_id in runs.items()}

    try:
        assert cli.main(["--params", str(REPO / "params.yaml"), "tidy_tracking"]) == 0
        said = capsys.readouterr().out
        assert statuses() == {"dead": "FAILED", "live": "RUNNING", "remote": "RUNNING", "untagged": "RUNNING"}
        assert f"marked FAILED: run {runs['dead']}" in said
        assert (f"left RUNNING: run {runs['remote']} (remote): process 4242 on host elsewhere.example.org cannot be "
                f"checked from host {HOST}; once that host's jobs are over, `tidy_tracking --host "
                "elsewhere.example.org` marks it FAILED") in said
        told = ["--params", str(REPO / "params.yaml"), "tidy_tracking", "--host", "elsewhere.example.org"]
        assert cli.main(told) == 0
        assert statuses() == {"dead": "FAILED", "live": "RUNNING", "remote": "FAILED", "untagged": "RUNNING"}
        assert "1 abandoned run(s) marked FAILED, 2 left RUNNING" in capsys.readouterr().out
    finally:
        _close_log_handlers()


def _close_log_handlers() -> None:
    root = logging.getLogger()
    for handler in root.handlers[:]:
        handler.close()
        root.removeHandler(handler)


def _interrupted(**_):
    raise KeyboardInterrupt


def _failing(**_):
    raise RuntimeError("boom")


def _terminated(**_):
    os.kill(os.getpid(), signal.SIGTERM)  # what a cancelled cluster job receives
    time.sleep(30)


@pytest.mark.parametrize("fault, code, error", [(_failing, 1, "RuntimeError: boom"),
                                                (_interrupted, 130, "KeyboardInterrupt"),
                                                (_terminated, 143, "Terminated: terminated by SIGTERM")],
                         ids=["error", "ctrl-c", "sigterm"])
def test_a_failed_or_interrupted_stage_is_recorded_failed(store, tmp_path, monkeypatch, fault, code, error):
    """The command exits 1 (130 after Ctrl-C, 143 after SIGTERM), its log names its run and holds the traceback, its
    run is FAILED."""
    from detr_sparsity.stages import summary

    monkeypatch.setattr(summary, "run_stage", lambda cfg, tracked, **paths: fault(**paths))
    log = tmp_path / "summary.log"
    try:
        assert cli.main(["--params", str(REPO / "params.yaml"), "--log", str(log), "summary",
                         "--out", str(tmp_path / "summary.json"), "--metrics", str(tmp_path / "metrics.json"),
                         "--comparisons", str(tmp_path / "comparisons.json")]) == code
    finally:
        _close_log_handlers()
    text = log.read_text()
    assert "summary failed" in text and "Traceback (most recent call last)" in text and error in text
    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'summary'")
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command left SIGTERM as it found it
    # the log names its run, before the work that failed (the cost stage reads that line back)
    assert f"MLflow run {run.info.run_id} (experiment detr-sparsity-synthetic)" in text.split("summary failed")[0]
    assert tracking.logged_run_id(text) == run.info.run_id


def test_a_job_process_collects_its_stages_garbage(store, tmp_path, monkeypatch):
    """`python -m detr_sparsity` (cli.job) pauses Python's garbage collector for its start-up only: the stage's work
    runs with the collector on, the start-up's objects frozen out of its sight; the process ends with it on."""
    from detr_sparsity.stages import summary

    seen = {}

    def work(cfg, tracked, **paths):
        seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())

    monkeypatch.setattr(summary, "run_stage", work)
    monkeypatch.setattr(sys, "argv", ["detr_sparsity", "--params", str(REPO / "params.yaml"), "--log",
                                      str(tmp_path / "summary.log"), "summary", "--out", str(tmp_path / "s.json"),
                                      "--metrics", str(tmp_path / "m.json"), "--comparisons", str(tmp_path / "c.json")])
    assert gc.isenabled() and gc.get_freeze_count() == 0
    try:
        assert cli.job() == 0
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test's process goes on: its objects back in the collector's sight
        gc.enable()
        _close_log_handlers()
    assert seen["enabled"] and seen["frozen"] > 0


def test_every_stage_run_records_its_cost_and_machine(store, tmp_path, monkeypatch):
    """Wall and CPU seconds, torch threads, and the machine (its instruction-set class read independently here)."""
    import yaml

    from detr_sparsity.cli import run_stage
    from tiny_project import TINY, make_tiny_project

    root = make_tiny_project(tmp_path / "project")
    monkeypatch.chdir(root)
    cfg = load_config(root / "params.yaml")
    run_id = run_stage(cfg, "data", out=root / "results/synthetic/data")
    run = MlflowClient(store).get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert 0 < metrics["cpu_seconds"] and 0 < metrics["wall_seconds"] < 600
    assert metrics["threads"] >= 1
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert tags["machine.instruction_set"] == ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags
                                               else "other")
    assert int(tags["machine.cores"]) >= 1 and float(tags["machine.load_average"]) >= 0
    splits = yaml.safe_load((root / "results/synthetic/data/splits.json").read_text())
    assert set(splits) == set(TINY["data"]["splits"])  # the stage itself ran


def test_a_job_keeps_busy_the_cores_its_scheduler_gave_it(monkeypatch):
    """Snakemake sets OMP_NUM_THREADS to a job's threads; without it (DVC, by hand) a job may use every core it can
    run on."""
    import os

    from detr_sparsity.machine import job_cores

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_cores() == 3
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert job_cores() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert job_cores() == len(os.sched_getaffinity(0))


def test_a_jobs_recorded_threads_are_the_cores_it_kept_busy(monkeypatch):
    """Torch's threads where the stage used torch; where it did not, the processes of a stage declared on every
    core (the summary's: Snakemake's OMP_NUM_THREADS), and 1 for a one-thread stage."""
    import sys

    import torch

    from detr_sparsity.cli import _job_threads
    from detr_sparsity.pipeline import PIPELINE

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _job_threads(PIPELINE["summary"]) == _job_threads(PIPELINE["tables"]) == torch.get_num_threads()
    monkeypatch.delitem(sys.modules, "torch")
    assert PIPELINE["summary"].threads is None and PIPELINE["tables"].threads == 1
    assert (_job_threads(PIPELINE["summary"]), _job_threads(PIPELINE["tables"])) == (3, 1)
