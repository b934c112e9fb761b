"""The study's cost: wall-clock and CPU time of every job behind its current outputs, per stage, as their MLflow
runs measured it (stage `cost`, results/<study>/benchmark/cost.json; table T6).

Which runs: every job writes into its log, before any work, the line naming its run (`tracking.run_line`), and
the log is an output of the job like the others. So the jobs are found through the declaration (each stage
upstream of the cost stage, each point of its sweep; a gather job's shard jobs by the count its run records),
and each job's run is the last one its log names (`tracking.logged_run_id`). Earlier runs of the same job, and
anything else in the store, are not counted: the cost is that of the outputs as they are.

Every such run must be in the store and FINISHED with its cost recorded; otherwise nothing is reported and the
error names each log, its run and the store, and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr_sparsity import tracking
from detr_sparsity.config import StudyConfig
from detr_sparsity.pipeline import PIPELINE, Stage, render, sweep_points, upstream

# What cli.run_stage records of every stage run: its cost (metrics) and the machine it ran on (tags).
COST_METRICS = ("wall_seconds", "cpu_seconds", "threads")
MACHINE_TAGS = ("cpu", "instruction_set", "cores", "load_average")


class CostError(RuntimeError):
    """A job whose log does not lead to a finished run with its cost in the store."""


@dataclass(frozen=True)
class Job:
    """One job of a stage: its point of the sweep, its log, the run that log names last, and which shard it
    detected (None: not a shard job)."""

    stage: str
    point: dict[str, Any]
    log: Path
    run_id: str | None
    shard: str | None = None  # "K/N"


def _job(cfg: StudyConfig, stage: Stage, point: dict[str, Any], shard: tuple[int, int] | None = None) -> Job:
    log = Path(render(stage.log(shard=shard is not None), study=cfg.name, **point,
                      **({"shard": shard[0]} if shard else {})))
    text = log.read_text(errors="replace") if log.is_file() else ""
    return Job(stage.name, point, log, tracking.logged_run_id(text), f"{shard[0]}/{shard[1]}" if shard else None)


def _problem(job: Job, run: tracking.RecordedRun | None, uri: str) -> str | None:
    """Why `job`'s run cannot be counted, naming the log, the run and the store, and what to do; None if it can."""
    rerun = f"rerun stage {job.stage} (e.g. `snakemake --forcerun {job.stage}`)"
    if not job.log.is_file():
        return f"{job.log}: no such log, so nothing says which run made stage {job.stage}'s outputs there; {rerun}"
    if job.run_id is None:
        return (f"{job.log} names no MLflow run (no line '{tracking.run_line('<id>', '<name>')}'): its job ran before "
                f"stages named their run in their log, or stopped before opening one; {rerun}")
    if run is None:
        return (f"{job.log} names MLflow run {job.run_id}, which the store at {uri} does not hold: point "
                f"MLFLOW_TRACKING_URI at the store the study ran with, or {rerun}")
    if run.status != "FINISHED":
        return (f"{job.log} names MLflow run {job.run_id} (store {uri}), whose status is {run.status}, not FINISHED: "
                f"the job that made those outputs did not finish; {rerun}")
    if run.tags.get("stage") != job.stage:
        return (f"{job.log} names MLflow run {job.run_id} (store {uri}), a run of stage {run.tags.get('stage')}, not "
                f"of {job.stage}; {rerun}")
    if job.shard is not None and run.tags.get("setting.shard") != job.shard:
        return (f"{job.log} names MLflow run {job.run_id} (store {uri}), of shard {run.tags.get('setting.shard')}, "
                f"not of shard {job.shard} as its gather job's run says; {rerun}")
    missing = [m for m in COST_METRICS if m not in run.metrics]
    missing += [f"machine.{t}" for t in MACHINE_TAGS if f"machine.{t}" not in run.tags]
    if missing:
        return (f"{job.log} names MLflow run {job.run_id} (store {uri}), which records no {', '.join(missing)} (a "
                f"run from before stage runs recorded their cost); {rerun}")
    return None


def _check(jobs: list[Job], runs: dict[str, tracking.RecordedRun], uri: str) -> None:
    problems = [p for job in jobs if (p := _problem(job, runs.get(job.run_id or ""), uri)) is not None]
    if problems:
        raise CostError(f"the study's cost cannot be reported: {len(problems)} of {len(jobs)} job log(s) do not lead "
                        "to a finished run with its cost:\n  " + "\n  ".join(problems))


def jobs_and_runs(cfg: StudyConfig, stages: list[str]) -> tuple[list[Job], dict[str, tracking.RecordedRun]]:
    """Every job of `stages` (a gather job's shard jobs after it) and the run each job's log names last; raises
    CostError, naming every log that leads to no finished run with its cost."""
    uri = tracking.tracking_uri()
    jobs = [_job(cfg, PIPELINE[name], point) for name in stages for point in sweep_points(PIPELINE[name], cfg)]
    runs = tracking.runs_by_id(job.run_id for job in jobs if job.run_id)
    _check(jobs, runs, uri)
    # A gather job's run says how many shard jobs detected for it (none where it evaluated whole, as under DVC);
    # their logs are known only now.
    with_shards: list[Job] = []
    for job in jobs:
        count = int(runs[job.run_id].tags.get(tracking.GATHERED_SHARDS, 0))
        with_shards += [job, *(_job(cfg, PIPELINE[job.stage], job.point, (k, count)) for k in range(1, count + 1))]
    shards = [job for job in with_shards if job.shard is not None]
    runs.update(tracking.runs_by_id(job.run_id for job in shards if job.run_id))
    _check(shards, runs, uri)
    return with_shards, runs


def _machine(run: tracking.RecordedRun) -> dict[str, Any]:
    tags = {key: run.tags[f"machine.{key}"] for key in MACHINE_TAGS}
    return {"cpu": tags["cpu"], "instruction_set": tags["instruction_set"], "cores": int(tags["cores"]),
            "load_average": float(tags["load_average"])}


def _job_record(job: Job, run: tracking.RecordedRun) -> dict[str, Any]:
    return {"stage": job.stage, "setting": run.tags.get("setting", ""), "log": str(job.log), "run_id": job.run_id,
            "status": run.status, "wall_seconds": run.metrics["wall_seconds"],
            "cpu_seconds": run.metrics["cpu_seconds"], "threads": int(run.metrics["threads"]),
            "machine": _machine(run), "host": run.tags.get("host", ""), "started": run.started, "ended": run.ended}


def _summed(records: list[dict[str, Any]], total_wall: float) -> dict[str, Any]:
    """Jobs, summed wall and CPU seconds, the thread counts seen, the share of the study's wall seconds."""
    wall = sum(r["wall_seconds"] for r in records)
    return {"jobs": len(records), "wall_seconds": wall, "cpu_seconds": sum(r["cpu_seconds"] for r in records),
            "threads": sorted({r["threads"] for r in records}),
            "share": wall / total_wall if total_wall > 0 else 0.0}


def _seen(records: list[dict[str, Any]], key: str) -> list:
    return sorted({r["machine"][key] for r in records})


def _machines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct machines (CPU model, instruction set, cores), in the order their first job ran."""
    found: dict[tuple, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["started"]):
        m = r["machine"]
        found.setdefault((m["cpu"], m["instruction_set"], m["cores"]),
                         {"cpu": m["cpu"], "instruction_set": m["instruction_set"], "cores": m["cores"]})
    return list(found.values())


def not_reported(stage: str) -> dict[str, str]:
    """Each stage of the pipeline that `stage` does not report on, and why."""
    reported = set(upstream(stage))
    reasons = {}
    for name in PIPELINE:
        if name == stage:
            reasons[name] = "this stage: its own run records its cost"
        elif stage in upstream(name):
            reasons[name] = f"runs after it: it reads {stage}'s output, directly or through another stage"
        elif name not in reported:
            reasons[name] = "not upstream of it: it may run at the same time"
    return reasons


def study_cost(cfg: StudyConfig, stage: str) -> dict[str, Any]:
    """What the study's current outputs cost: per stage upstream of `stage` (in pipeline order) and in total, jobs,
    wall and CPU seconds (sums over jobs), threads per job, share of the wall seconds, the machines and run statuses
    seen; every job with its run. Raises CostError before anything is reported where a job's log leads to no
    finished run with its cost."""
    stages = upstream(stage)
    jobs, runs = jobs_and_runs(cfg, stages)
    records = [_job_record(job, runs[job.run_id]) for job in jobs]
    total_wall = sum(r["wall_seconds"] for r in records)
    per_stage = []
    for name in stages:
        mine = [r for r in records if r["stage"] == name]
        per_stage.append({"stage": name, **_summed(mine, total_wall),
                          "machine": {key: _seen(mine, key) for key in MACHINE_TAGS},
                          "status": sorted({r["status"] for r in mine})})
    return {
        "study": cfg.name,
        "tracking_uri": tracking.tracking_uri(),
        "stages": per_stage,
        "total": _summed(records, total_wall),
        "machines": _machines(records),
        "started": min((r["started"] for r in records), default=None),
        "ended": max((r["ended"] for r in records if r["ended"]), default=None),
        "not_reported": not_reported(stage),
        "note": ("Per job, its MLflow run's wall_seconds and cpu_seconds (this process and the children it waited "
                 "for) and torch threads; the run is the last one named in the job's log. Sums over jobs: jobs that "
                 "ran side by side count each, so the total wall seconds exceed the elapsed time of a parallel run. "
                 "Machine: CPU model, instruction-set class, cores the job could use, and the load average when it "
                 "started."),
        "jobs": records,
    }
