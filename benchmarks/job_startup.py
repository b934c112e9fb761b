"""What a pipeline job's process costs beyond its work: real jobs of a finished study (`python -m detr_sparsity`,
one torch thread, as Snakemake runs them), timed from process start to exit, in three ways:
- `before`: Python's cyclic garbage collector left running through the start-up and the exit (the entry point until
  2026-12-07, restated here by making `gc.disable` and `gc.freeze` do nothing);
- `after`: the job in its own process, as a cluster job or `dvc repro` runs it;
- `job_server`: started by a job server (job_server.py) as a local Snakemake run starts it, the server being this
  benchmark's, started once before the timings (its own import is not timed: a study pays it once).

The variants alternate, `--repeats` times each; every job writes its outputs into a temporary folder and its MLflow
run into a temporary SQLite store, so the study is left as it was. Run in the project root of a finished study:

    python benchmarks/job_startup.py --repeats 5

Writes results/<study>/benchmark/job_startup.json (or --out).
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import arguments, parse, report

from detr_sparsity import job_server
from detr_sparsity.pipeline import PIPELINE, command, render, sweep_points
from detr_sparsity.processes import this_process
from detr_sparsity.tracking import logged_run_id, runs_by_id

# The stages timed, at the first point of their sweeps: short evaluations, as most of a study's jobs are.
STAGES = ["mgs_evaluate", "sibs"]

BEFORE = ("import gc, runpy; gc.disable = gc.freeze = lambda: None; "
          "runpy.run_module('detr_sparsity', run_name='__main__')")
VARIANTS = {"before": [sys.executable, "-c", BEFORE], "after": [sys.executable, "-m", "detr_sparsity"],
            "job_server": [sys.executable, "-m", "detr_sparsity"]}


def job_arguments(cfg, stage_name: str, scratch: Path) -> list[str]:
    """The job's command line after `python -m detr_sparsity`, its outputs and log redirected into `scratch`."""
    stage = PIPELINE[stage_name]
    point = sweep_points(stage, cfg)[0]
    inputs = stage.command_inputs()

    def fill(kind: str, name: str) -> str:
        if kind == "axis":
            return str(point[name])
        if kind == "input":
            return render(inputs[name], study=cfg.name, **point)
        return str(scratch / name)

    line = command(stage, fill, str(scratch / "job.log"))
    return shlex.split(line)[3:]  # after "python -m detr_sparsity"


def stage_wall(log: Path) -> float:
    """The wall seconds the job recorded for its stage, as the cost stage reads them: the `wall_seconds` of the MLflow
    run its log names (from the run's start)."""
    run_id = logged_run_id(log.read_text())
    return runs_by_id([run_id])[run_id].metrics["wall_seconds"]


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(arguments(__doc__, "job_startup", repeats=5), argv)
    seconds = {stage: {name: [] for name in VARIANTS} for stage in STAGES}
    recorded = {stage: {name: [] for name in VARIANTS} for stage in STAGES}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        # The jobs' runs, and this process's reading of them (stage_wall), in a store of its own.
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "detr_sparsity", "--params", str(args.params), "init_tracking"],
                       check=True, env=env, capture_output=True)
        server = job_server.start(this_process(), scratch / "job_server.log")
        os.environ.pop(job_server.SERVER_ENV)  # named to the job_server variant's jobs only
        try:
            server.wait_serving(timeout=300)  # its imports: before the timings
        except RuntimeError as error:
            job_server.stop(server)
            raise SystemExit(str(error)) from None
        environments = {"before": env, "after": env, "job_server": {**env, job_server.SERVER_ENV: server.socket}}
        try:
            for _ in range(args.repeats):
                for stage in STAGES:
                    for name, python in VARIANTS.items():
                        out = scratch / f"{stage}-{name}"
                        out.mkdir(exist_ok=True)
                        job = job_arguments(cfg, stage, out)
                        start = time.perf_counter()
                        subprocess.run([*python, "--params", str(args.params), *job], check=True,
                                       env=environments[name], capture_output=True)
                        seconds[stage][name].append(time.perf_counter() - start)
                        recorded[stage][name].append(stage_wall(out / "job.log"))
                        # the server ran the job_server variant, and only that one
                        started_by_server = "started by the job server" in (out / "job.log").read_text()
                        assert started_by_server == (name == "job_server"), (stage, name)
        finally:
            job_server.stop(server)
    median = {stage: {name: statistics.median(s) for name, s in by.items()} for stage, by in seconds.items()}
    outside = {stage: {name: median[stage][name] - statistics.median(recorded[stage][name]) for name in VARIANTS}
               for stage in STAGES}
    result = {"benchmark": "job_startup", "repeats": args.repeats, "threads": 1, "stages": STAGES,
              "process_seconds": seconds, "median_process_seconds": median,
              "recorded_stage_seconds": recorded, "median_seconds_outside_stage_run": outside,
              "saved_seconds": {stage: median[stage]["before"] - median[stage]["after"] for stage in STAGES},
              "saved_by_job_server_seconds": {stage: median[stage]["after"] - median[stage]["job_server"]
                                              for stage in STAGES}}
    return report(result, args.out, cfg.name, "; ".join(
        f"{stage}: {median[stage]['before']:.2f} s before, {median[stage]['after']:.2f} s after, "
        f"{median[stage]['job_server']:.2f} s started by the job server (outside the stage's run "
        f"{outside[stage]['before']:.2f}, {outside[stage]['after']:.2f} and {outside[stage]['job_server']:.2f} s)"
        for stage in STAGES))


if __name__ == "__main__":
    sys.exit(main())
