"""The study's cost (stage `cost`): on a small MLflow store made through the project's own tracking code and job logs
written by hand, the per-stage sums and shares equal hand-computed numbers; only the last run a log names counts; a
gather job's shard jobs count; and a log that leads to no finished run stops the stage before it writes, naming the
log, the run and the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from detr_sparsity import tracking
from detr_sparsity.config import load_config
from detr_sparsity.pipeline import PIPELINE, upstream
from detr_sparsity.reporting.cost import CostError, study_cost
from tiny_project import TINY_SWEEPS, Untracked, tiny_params, write_study_settings

EXPERIMENT = "detr-sparsity-synthetic"
A = {"cpu": "Test CPU A", "instruction_set": "avx512", "cores": 2}
B = {"cpu": "Test CPU B", "instruction_set": "avx2", "cores": 8}

# Every job of the tiny study's sweeps (TINY_SWEEPS), written by hand: stage, log name, setting, wall and CPU seconds,
# threads, machine, load average. The dense evaluation was gathered from 2 shard jobs. Wall seconds sum to 2000.
JOBS = [
    ("data", "data", None, 10, 10, 1, A, 0.5),
    ("model", "model", None, 600, 1100, 2, A, 0.5),
    ("evaluate", "evaluate-dense", {"method": "dense"}, 10, 10, 1, A, 0.5),
    ("evaluate", "evaluate-dense-shard-1", {"method": "dense", "shard": "1/2"}, 45, 45, 1, A, 0.5),
    ("evaluate", "evaluate-dense-shard-2", {"method": "dense", "shard": "2/2"}, 45, 45, 1, A, 0.5),
    ("profile", "profile", None, 10, 10, 1, A, 0.5),
    ("masking", "masking-topk-1.0", {"method": "topk", "keep_ratio": 1.0}, 200, 180, 1, A, 0.5),
    ("masking", "masking-topk-0.25", {"method": "topk", "keep_ratio": 0.25}, 200, 180, 1, A, 1.5),
    ("masking", "masking-random-1.0", {"method": "random", "keep_ratio": 1.0}, 200, 180, 1, A, 0.5),
    ("masking", "masking-random-0.25", {"method": "random", "keep_ratio": 0.25}, 200, 180, 1, A, 1.5),
    ("sibs", "sibs-0.0", {"threshold": 0.0}, 10, 10, 1, A, 0.5),
    ("sibs", "sibs-0.2", {"threshold": 0.2}, 10, 10, 1, A, 0.5),
    ("mgs_cache", "mgs_cache", None, 10, 20, 2, A, 0.5),
    ("mgs_local", "mgs_local", None, 10, 10, 1, A, 0.5),
    ("mgs_train", "mgs_train", None, 10, 10, 1, A, 0.5),
    ("mgs_calibrate", "mgs_calibrate-group_activity-0.5", {"objective": "group_activity", "target": 0.5}, 5, 5, 1, A,
     0.5),
    ("mgs_calibrate", "mgs_calibrate-distillation-0.5", {"objective": "distillation", "target": 0.5}, 5, 5, 1, A, 0.5),
    ("mgs_evaluate", "mgs_evaluate-group_activity-0.5", {"objective": "group_activity", "target": 0.5}, 10, 10, 1, A,
     0.5),
    ("mgs_evaluate", "mgs_evaluate-distillation-0.5", {"objective": "distillation", "target": 0.5}, 10, 10, 1, A, 0.5),
    ("mgs_single", "mgs_single-0.5", {"target": 0.5}, 10, 10, 1, A, 0.5),
    ("mgs_paper_setting", "mgs_paper_setting", None, 10, 10, 1, A, 0.5),
    ("summary", "summary", None, 10, 10, 1, A, 0.5),
    ("benchmark", "benchmark", None, 370, 490, 2, B, 1.25),
]
ANALYSIS = ["data", "model", "evaluate", "profile", "masking", "sibs", "mgs_cache", "mgs_local", "mgs_train",
            "mgs_calibrate", "mgs_evaluate", "mgs_single", "mgs_paper_setting", "summary", "benchmark"]
# Per stage, by hand from JOBS: jobs, wall seconds, CPU seconds, threads per job; the share is wall / 2000.
EXPECTED = {"data": (1, 10, 10, [1]), "model": (1, 600, 1100, [2]), "evaluate": (3, 100, 100, [1]),
            "profile": (1, 10, 10, [1]), "masking": (4, 800, 720, [1]), "sibs": (2, 20, 20, [1]),
            "mgs_cache": (1, 10, 20, [2]), "mgs_local": (1, 10, 10, [1]), "mgs_train": (1, 10, 10, [1]),
            "mgs_calibrate": (2, 10, 10, [1]),
            "mgs_evaluate": (2, 20, 20, [1]), "mgs_single": (1, 10, 10, [1]), "mgs_paper_setting": (1, 10, 10, [1]),
            "summary": (1, 10, 10, [1]), "benchmark": (1, 370, 490, [2])}


def stage_run(cfg, stage: str, setting: dict | None, wall: float, cpu: float, threads: int, machine: dict,
              load: float, tags: dict | None = None, fail: bool = False) -> str:
    """One run as cli.run_stage records it (its cost metrics and machine tags), through tracking.stage_run."""
    try:
        with tracking.stage_run(cfg, stage, {"study": cfg.name}, setting) as run:
            if fail:
                raise RuntimeError("the job failed")
            run.log_metrics({"wall_seconds": wall, "cpu_seconds": cpu, "threads": threads})
            run.set_tags({**{f"machine.{key}": str(value) for key, value in {**machine, "load_average": load}.items()},
                          **(tags or {})})
    except RuntimeError:
        pass
    return run.run_id


def write_log(root: Path, name: str, *run_ids: str) -> Path:
    """A job's log as cli.run_stage writes it: each run it names on a line of its own, among other lines."""
    log = root / f"results/synthetic/logs/{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    lines = ["2026-01-01 10:00:00,000 INFO detr_sparsity: computing on cpu"]
    for run_id in run_ids:
        lines += [f"2026-01-01 10:00:01,000 INFO detr_sparsity: MLflow run {run_id} (experiment {EXPERIMENT})",
                  "2026-01-01 10:00:02,000 INFO detr_sparsity: cost: 1.0 s wall"]
    log.write_text("\n".join(lines) + "\n")
    return log


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny study's params, an MLflow store holding one run per job of JOBS (and an earlier run of one job,
    which its log names first) and every job's log; made once, copied by `study`."""
    root = tmp_path_factory.mktemp("cost")
    params = tiny_params()
    params.update(TINY_SWEEPS)
    write_study_settings(root, params)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        cfg = load_config(root / "params.yaml")
        tracking.init_store(cfg)
        # An earlier run of masking topk-0.25 whose outputs the job's second run replaced: never counted.
        earlier = stage_run(cfg, "masking", {"method": "topk", "keep_ratio": 0.25}, 5000, 5000, 4, B, 9.0)
        run_ids = {}
        for stage, name, setting, wall, cpu, threads, machine, load in JOBS:
            tags = {tracking.GATHERED_SHARDS: "2"} if name == "evaluate-dense" else {}
            run_ids[name] = stage_run(cfg, stage, setting, wall, cpu, threads, machine, load, tags)
            write_log(root, name, *([earlier] if name == "masking-topk-0.25" else []), run_ids[name])
    mlflow.set_tracking_uri(None)
    return root, run_ids, earlier


@pytest.fixture
def study(made, tmp_path, monkeypatch):
    """A copy of the made study and its store, as the working directory, with its config."""
    root = tmp_path / "study"
    shutil.copytree(made[0], root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield load_config(root / "params.yaml"), root, made[1]
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- the declaration

def test_the_cost_stage_reports_on_every_stage_that_computes_and_reads_their_sweeps():
    assert upstream("cost") == ANALYSIS
    # tables and the paper read cost.json, so they come after it; the figures do not need to
    assert {"cost"} <= set(upstream("tables")) and "cost" in upstream("paper") and "cost" not in upstream("figures")
    sweeps = {axis.values for name in upstream("cost") for axis in PIPELINE[name].sweep if isinstance(axis.values, str)}
    assert set(PIPELINE["cost"].keys) == sweeps


# ---------------------------------------------------------------- known answers

def test_per_stage_sums_and_shares_are_the_hand_computed_ones(study):
    cfg, root, run_ids = study
    cost = study_cost(cfg, "cost")
    assert [s["stage"] for s in cost["stages"]] == ANALYSIS
    for entry in cost["stages"]:
        jobs, wall, cpu, threads = EXPECTED[entry["stage"]]
        assert (entry["jobs"], entry["threads"], entry["status"]) == (jobs, threads, ["FINISHED"]), entry["stage"]
        assert entry["wall_seconds"] == pytest.approx(wall) and entry["cpu_seconds"] == pytest.approx(cpu)
        assert entry["share"] == pytest.approx(wall / 2000), entry["stage"]
    total = cost["total"]
    assert (total["jobs"], total["threads"]) == (23, [1, 2])
    assert total["wall_seconds"] == pytest.approx(2000) and total["cpu_seconds"] == pytest.approx(2550)
    assert total["share"] == pytest.approx(1.0)

    # the machines: per stage the values seen, for the study the distinct ones, in the order they first ran
    by_stage = {s["stage"]: s for s in cost["stages"]}
    assert by_stage["benchmark"]["machine"] == {"cpu": ["Test CPU B"], "instruction_set": ["avx2"], "cores": [8],
                                                "load_average": [1.25]}
    assert by_stage["masking"]["machine"]["load_average"] == [0.5, 1.5]
    assert cost["machines"] == [A, B]

    # every job with the run its log names last: the earlier run of masking topk-0.25 (5000 s) is not counted
    jobs = {Path(job["log"]).name: job for job in cost["jobs"]}
    assert set(jobs) == {f"{name}.log" for _stage, name, *_rest in JOBS}
    assert {name: jobs[f"{name}.log"]["run_id"] for name in run_ids} == run_ids
    assert jobs["masking-topk-0.25.log"]["setting"] == "method=topk keep_ratio=0.25"
    assert jobs["evaluate-dense-shard-2.log"]["setting"] == "method=dense shard=2/2"
    assert cost["started"] == min(j["started"] for j in cost["jobs"]) <= cost["ended"]
    assert set(cost["not_reported"]) == {"cost", "figures", "tables", "paper"}
    assert cost["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"


def test_the_command_writes_cost_json_and_names_its_own_run_in_its_log(study):
    """`python -m detr_sparsity cost` as both orchestrators call it: cost.json, and its own run, FINISHED."""
    import logging

    from detr_sparsity import cli

    cfg, root, _run_ids = study
    out, log = root / "results/synthetic/benchmark/cost.json", root / "results/synthetic/logs/cost.log"
    try:
        assert cli.main(["--params", str(root / "params.yaml"), "--log", str(log), "cost", "--summary",
                         "results/synthetic/summary.json", "--speed", "results/synthetic/benchmark/speed.json",
                         "--out", str(out)]) == 0
    finally:
        for handler in logging.getLogger().handlers[:]:
            handler.close()
            logging.getLogger().removeHandler(handler)
    written = json.loads(out.read_text())
    assert written["total"]["jobs"] == 23 and written["total"]["wall_seconds"] == pytest.approx(2000)
    own = tracking.runs_by_id([tracking.logged_run_id(log.read_text())])
    [run] = own.values()
    assert (run.status, run.tags["stage"], run.metrics["study_jobs"]) == ("FINISHED", "cost", 23)


# ---------------------------------------------------------------- errors, before anything is written

def test_a_log_without_a_run_line_stops_the_stage_before_it_writes(study):
    from detr_sparsity.stages import cost as cost_stage

    cfg, root, _run_ids = study
    log = root / "results/synthetic/logs/mgs_local.log"
    log.write_text("2026-01-01 10:00:00,000 INFO detr_sparsity: computing on cpu\n")
    out = root / "results/synthetic/benchmark/cost.json"
    with pytest.raises(CostError) as raised:
        cost_stage.run_stage(cfg, Untracked(), summary=Path("summary.json"), speed=Path("speed.json"), out=out)
    message = str(raised.value)
    assert "1 of 21 job log(s)" in message  # the 21 jobs the sweeps name; shard logs are read after them
    assert "results/synthetic/logs/mgs_local.log names no MLflow run" in message
    assert "rerun stage mgs_local" in message
    assert not out.exists() and not list(out.parent.glob("*"))


def test_a_run_the_store_does_not_hold_names_the_log_the_run_and_the_store(study):
    cfg, root, _run_ids = study
    unknown = "0123456789abcdef0123456789abcdef"
    write_log(root, "sibs-0.2", unknown)
    with pytest.raises(CostError) as raised:
        study_cost(cfg, "cost")
    message = str(raised.value)
    assert (f"results/synthetic/logs/sibs-0.2.log names MLflow run {unknown}, which the store at "
            f"sqlite:///{root / 'mlflow.db'} does not hold: point MLFLOW_TRACKING_URI at the store") in message


def test_a_store_that_does_not_exist_is_not_created(study, monkeypatch):
    cfg, root, _run_ids = study
    elsewhere = root / "elsewhere/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    with pytest.raises(CostError) as raised:
        study_cost(cfg, "cost")
    assert "21 of 21 job log(s)" in str(raised.value)
    assert "results/synthetic/logs/data.log names MLflow run" in str(raised.value)
    assert f"the store at sqlite:///{elsewhere} does not hold" in str(raised.value)
    assert not elsewhere.exists()


def test_a_failed_run_is_refused_even_after_a_finished_one_in_the_same_log(study):
    cfg, root, run_ids = study
    failed = stage_run(cfg, "summary", None, 1, 1, 1, A, 0.5, fail=True)
    write_log(root, "summary", run_ids["summary"], failed)  # the last run named is the one that counts
    with pytest.raises(CostError) as raised:
        study_cost(cfg, "cost")
    assert (f"results/synthetic/logs/summary.log names MLflow run {failed} (store sqlite:///{root / 'mlflow.db'}), "
            "whose status is FAILED, not FINISHED") in str(raised.value)


def test_a_shard_log_of_another_sharding_is_refused(study):
    """A gather job of 2 shards whose second shard log names a run of shard 2 of 3 (left from another setting)."""
    cfg, root, _run_ids = study
    stale = stage_run(cfg, "evaluate", {"method": "dense", "shard": "2/3"}, 1, 1, 1, A, 0.5)
    write_log(root, "evaluate-dense-shard-2", stale)
    with pytest.raises(CostError) as raised:
        study_cost(cfg, "cost")
    assert "1 of 2 job log(s)" in str(raised.value)
    assert (f"results/synthetic/logs/evaluate-dense-shard-2.log names MLflow run {stale} (store "
            f"sqlite:///{root / 'mlflow.db'}), of shard 2/3, not of shard 2/2") in str(raised.value)
