"""`python -m detr_sparsity <stage>`: one subcommand per stage of the pipeline's declaration (`pipeline.py`).

Snakemake and DVC call exactly these commands. Each validates params.yaml and its own arguments before any work,
then logs to its log file, records one MLflow run (named in the log before any work: `MLflow run <id> (experiment
<name>)`) and writes only its declared outputs. A failure's traceback goes to the log file too, and the command
exits non-zero: 1, or 130 after Ctrl-C and 143 after SIGTERM (a cancelled cluster job), both of which record the
stage's run FAILED as a failure does.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from detr_sparsity.config import ConfigError, StudyConfig, load_config
from detr_sparsity.data.coco_root import describe_source, root_problem
from detr_sparsity.job_server import STARTED_BY_ENV
from detr_sparsity.machine import job_cores, machine
from detr_sparsity.pipeline import PIPELINE, Stage, describe, dvc_yaml, option, resources_problem, stage_params

log = logging.getLogger("detr_sparsity")


class Terminated(BaseException):
    """SIGTERM (a cancelled or timed-out cluster job, `kill`), raised like Ctrl-C's KeyboardInterrupt: the stage's
    run is recorded FAILED, its temporaries are removed and the traceback goes to its log."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    main = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != main:  # a forked worker (a DataLoader's) ends as it would by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def load_study(params: str | Path) -> StudyConfig:
    """The settings file (params.yaml), validated: the schema, the cross-field rules, the stage names of its
    resources and the study's data root."""
    cfg = load_config(params)
    problems = [p for p in (resources_problem(cfg), root_problem(cfg.data, f"studies.{cfg.name}")) if p]
    if problems:
        raise ConfigError(f"invalid {Path(params).name}:\n  " + "\n  ".join(problems))
    return cfg


# ---------------------------------------------------------------- commands that are not stages

def cmd_validate(cfg: StudyConfig, args) -> None:
    print(f"{args.params.name} is valid; study {cfg.name!r}")
    if (source := describe_source(cfg.data)) is not None:  # e.g. which layout a local COCO root has
        print(source)


def cmd_init_tracking(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking

    tracking.init_store(cfg)


def cmd_tidy_tracking(cfg: StudyConfig, args) -> None:
    """Mark FAILED the runs left RUNNING by killed processes; say what is left RUNNING, and why."""
    from detr_sparsity import tracking

    checks = tracking.tidy_store(gone_hosts=args.host)
    for check in checks:
        print(check)
    failed = sum(check.failed for check in checks)
    print(f"{tracking.tracking_uri()}: {failed} abandoned run(s) marked FAILED, {len(checks) - failed} left RUNNING")


def cmd_stages(cfg: StudyConfig, args) -> None:
    print(describe())


def cmd_dvc_yaml(cfg: StudyConfig, args) -> None:
    """Write dvc.yaml from the declaration (or, with --check, fail when the file differs from it)."""
    text = dvc_yaml()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            raise SystemExit(f"error: {args.out} is not what the pipeline's declaration generates; "
                             "run `python -m detr_sparsity dvc_yaml`")
        print(f"{args.out} is current")
        return
    args.out.write_text(text)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------- stages

def run_stage(cfg: StudyConfig, name: str, **arguments) -> str:
    """Run stage `name` inside its MLflow run, with its paths and sweep point (and `sharding`) as keyword
    arguments, as its command does; returns the run's id."""
    from detr_sparsity import tracking

    stage = PIPELINE[name]
    module = importlib.import_module(stage.module)
    setting = {axis.name: arguments[axis.name] for axis in stage.sweep}
    sharding = arguments.get("sharding")
    if sharding is not None and sharding.detects_shard:  # a shard job's run is named after its shard
        setting["shard"] = f"{sharding.index}/{sharding.count}"
    if stage.device:  # a bad DETR_SPARSITY_DEVICE fails here, before any work
        from detr_sparsity.device import job_device

        log.info("computing on %s", job_device())
    if server := os.environ.get(STARTED_BY_ENV):
        log.info("started by the job server (process %s): torch, transformers and MLflow were imported there, once "
                 "for every job", server)
    where = machine()  # the load average before the stage adds its own
    wall, cpu = time.perf_counter(), _cpu_seconds()
    with tracking.stage_run(cfg, name, stage_params(cfg, name), setting or None) as run:
        # Before any work: the log, an output of every stage, then names the run that made the outputs beside it
        # (the cost stage reads it back), even where the work fails.
        log.info("%s", tracking.run_line(run.run_id, cfg.experiment))
        if sharding is not None and sharding.gathers:  # the shard jobs' runs did this job's detections
            run.set_tags({tracking.GATHERED_SHARDS: str(len(sharding.gather))})
        _collect_from_here()
        module.run_stage(cfg, run, **arguments)
        cost = {"wall_seconds": time.perf_counter() - wall, "cpu_seconds": _cpu_seconds() - cpu,
                "threads": _job_threads(stage)}
        run.log_metrics(cost)
        run.set_tags({f"machine.{key}": str(value) for key, value in where.items()})
        log.info("cost: %.1f s wall, %.1f s CPU, %d thread(s) on %s (%s, %d cores, load %.2f at start)",
                 cost["wall_seconds"], cost["cpu_seconds"], cost["threads"], where["cpu"],
                 where["instruction_set"], where["cores"], where["load_average"])
    return run.run_id


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of the children it waited for (latexmk)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _job_threads(stage: Stage) -> int:
    """The cores the job kept busy: torch's intra-op threads where the stage used torch (OMP_NUM_THREADS, which
    Snakemake sets); else the processes of a stage declared on every core (the summary's, `job_cores()`); else 1."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return job_cores() if stage.threads is None else 1


def cmd_stage(cfg: StudyConfig, args) -> None:
    stage = PIPELINE[args.stage]
    names = [*(axis.name for axis in stage.sweep), *stage.command_inputs(), *stage.outputs]
    arguments = {name: getattr(args, name) for name in names}
    if stage.shardable:
        arguments["sharding"] = args.sharding
    run_stage(cfg, stage.name, **arguments)


def _add_stage(sub, stage: Stage) -> None:
    p = sub.add_parser(stage.name, help=stage.help, description=f"Stage {stage.name}: {stage.help}.")
    for axis in stage.sweep:
        p.add_argument(option(axis.name), dest=axis.name, type=axis.parse, required=True, help=axis.allowed)
    for name, template in stage.command_inputs().items():
        p.add_argument(option(name), dest=name, type=Path, required=True, help=f"input: {template}")
    for name, template in stage.outputs.items():
        optional = name == stage.rows  # a shard job writes no rows
        p.add_argument(option(name), dest=name, type=Path, required=not optional,
                       help=f"output: {template}" + (" (required, except for a shard job)" if optional else ""))
    if stage.shardable:
        sharding = p.add_mutually_exclusive_group()
        sharding.add_argument("--shard", metavar="K/N",
                              help="detect only shard K of N of the split's batches; the detections output then "
                                   "receives the shard's partial evaluation (detections and counts)")
        sharding.add_argument("--gather", type=Path, nargs="+", metavar="SHARD",
                              help="merge these shard jobs' partial evaluations (in shard order) instead of "
                                   "detecting, then score and write as an unsharded job does")
    p.set_defaults(func=cmd_stage)


def _sharding(args, parser: argparse.ArgumentParser) -> None:
    """args.sharding from --shard / --gather; refuses what cannot work before any work."""
    from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding, parse_shard

    stage = PIPELINE[args.stage]
    detections = getattr(args, stage.detections)
    try:
        if args.shard:
            args.sharding = parse_shard(args.shard)
        elif args.gather:
            args.sharding = Sharding(gather=tuple(args.gather), output=detections)
        else:
            args.sharding = WHOLE_SPLIT
    except ValueError as err:
        parser.error(str(err))
    if getattr(args, stage.rows) is None and not args.sharding.detects_shard:
        parser.error(f"{option(stage.rows)} is required, except for a shard job (--shard K/N with N > 1)")
    if args.gather:
        missing = [str(p) for p in args.gather if not p.exists()]
        if missing:
            parser.error(f"--gather: no partial evaluation at {', '.join(missing)} (run the shard jobs first)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detr_sparsity", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file")
    parser.add_argument("--log", type=Path, default=None, help="also write the log to this file")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    sub.add_parser("validate", help="check params.yaml and exit").set_defaults(func=cmd_validate)
    sub.add_parser("init_tracking", help="create the MLflow store and experiment (once, before parallel jobs)"
                   ).set_defaults(func=cmd_init_tracking)
    p = sub.add_parser("tidy_tracking", help="mark FAILED the MLflow runs whose process was killed",
                       description="Mark FAILED every run still RUNNING whose process is gone from its host (this "
                                   "host only: a process on another host cannot be checked from here, so its run is "
                                   "left RUNNING unless --host names that host).")
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="also mark FAILED the RUNNING runs of HOST: say so only once its jobs are over (repeatable)")
    p.set_defaults(func=cmd_tidy_tracking)
    sub.add_parser("stages", help="list the pipeline's stages, sweeps and outputs").set_defaults(func=cmd_stages)
    p = sub.add_parser("dvc_yaml", help="write dvc.yaml from the pipeline's declaration")
    p.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    p.add_argument("--check", action="store_true", help="only check that the file is current")
    p.set_defaults(func=cmd_dvc_yaml)
    for stage in PIPELINE.values():
        _add_stage(sub, stage)
    return parser


def job() -> int:
    """A command as the whole life of its process (`python -m detr_sparsity`, the `detr-sparsity` script): main(),
    without Python's cyclic garbage collector while the command starts and when it ends.

    A pipeline job imports torch, transformers and MLflow: about 950,000 objects that live as long as the process
    (1.5 % of them garbage). The collector's full passes over them as they accumulate took about 1 s of each job's
    start, and its last passes at the exit another 1.2 s; with the stage's own collections rescanning them, a job
    of `mgs_evaluate` took 11.0 s against 7.9 without (benchmarks/job_startup.py; a study runs 67 jobs). So the
    collector is paused until the stage's work begins (`_collect_from_here`, which first moves the objects made so
    far out of its sight), and at the end whatever is left is moved out of its sight too: the process ends, and the
    system reclaims its memory whole. Logs are flushed and closed at the exit as before (logging's exit handler).
    The commands that run no stage (validate, init_tracking, ...) are short and run paused throughout.
    """
    gc.disable()
    try:
        return main()
    finally:
        gc.freeze()


def _collect_from_here() -> None:
    """Resume the collector that `job()` paused for the start-up, for the stage's work (which makes garbage of its
    own); in a process that did not pause it (a test calling run_stage), nothing to do."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: exit 2 here, before anything is opened or written
    stage = PIPELINE.get(args.stage)
    if stage is not None and stage.shardable:
        _sharding(args, parser)
    try:
        cfg = load_study(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stage is not None:
        refusal = getattr(importlib.import_module(stage.module), "refusal", None)
        reason = refusal() if refusal else None
        if reason:  # e.g. the paper without LaTeX: nothing is attempted, no run is opened
            print(f"error: {reason}", file=sys.stderr)
            return 1
    _setup_logging(args.log)  # only now: a refused command leaves no log file
    try:
        with _sigterm_raises():
            args.func(cfg, args)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 1
        raise
    except BaseException as err:
        log.exception("%s failed", args.stage)  # the traceback goes to the log file too
        if isinstance(err, KeyboardInterrupt):
            return 130
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 1
    return 0
