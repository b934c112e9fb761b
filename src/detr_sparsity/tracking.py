"""The only module that talks to MLflow: one run per stage run, tagged so runs can be found and grouped.

Default store: `sqlite:///mlflow.db` in the project root (MLflow 3's default; the file store is deprecated).
A team sets MLFLOW_TRACKING_URI to a tracking server instead. Concurrent schema migrations of a fresh SQLite store
lose runs, so every process opens a SQLite store and creates the study's experiment under a file lock beside it
(`mlflow.db.lock`): stages started together on a fresh store, by any orchestrator or by hand, all land.

Every run records the host, process id, start and PID namespace of the process holding it. A process killed
outright (SIGKILL, a lost node) leaves its run RUNNING: the next run of the same stage and setting, or
`tidy_tracking`, marks it FAILED once its process is gone from its host. A run from another host is left alone,
since its process cannot be checked from here, unless the caller says that host's jobs are over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from detr_sparsity.config import StudyConfig
from detr_sparsity.processes import HOST, Writer, this_process

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Groups the runs of one `snakemake` / `dvc repro` invocation; set by the orchestrator, else per process.
PIPELINE_RUN_ENV = "DETR_SPARSITY_PIPELINE_RUN"
# Pending step metrics are written at least this often: a killed stage loses at most its last seconds of them.
FLUSH_SECONDS = 2.0
# The line a stage writes into its log once its run exists (`run_line`): the log is a DVC-tracked output of every
# stage, so each output thereby records the run that produced it; the cost stage reads it back (`logged_run_id`).
RUN_LINE = re.compile(r"MLflow run (\w+) \(experiment .*\)$", re.M)
# Tag of a gather job's run: how many shard jobs' partial evaluations it merged (their runs are the shards' cost).
GATHERED_SHARDS = "gathered_shards"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working directory, as MLflow reads it), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    name = uri[len(prefix):].partition("?")[0]
    return Path(name) if name and name != ":memory:" else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Held while a process opens a SQLite store (which may migrate its schema) and creates an experiment;
    a server serialises these itself."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(cfg: StudyConfig) -> tuple[MlflowClient, str]:
    """A client on the store and the id of the study's experiment, creating the store's schema and the
    experiment where missing, one process at a time."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        client = MlflowClient(uri)  # opening a SQLite store creates or migrates its schema
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        try:
            return client, client.create_experiment(cfg.experiment)
        except MlflowException as err:  # a server: another job created it first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client, client.get_experiment_by_name(cfg.experiment).experiment_id


def init_store(cfg: StudyConfig) -> str:
    """Create the store's schema and the study's experiment; returns the experiment id."""
    _client, experiment_id = open_store(cfg)
    log.info("MLflow store %s ready, experiment %r (id %s)", tracking_uri(), cfg.experiment, experiment_id)
    return experiment_id


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class StageRun:
    """Handle on the active stage run: metrics (batched), artifacts and the run id."""

    def __init__(self, run_id: str, client: MlflowClient, params_hash: str = ""):
        self.run_id, self.client = run_id, client
        self.params_hash = params_hash  # equal hashes, equal settings: names a stage's resumable checkpoints
        self._pending: list[Metric] = []
        self._flushed = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        # Per-step training metrics are written in batches (one transaction per 500 values, not per value), and
        # every FLUSH_SECONDS at least, so that a killed stage loses only its last seconds of them.
        if step is None or len(self._pending) >= 500 or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._flushed = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def run_name(stage: str, setting: dict[str, Any] | None = None) -> str:
    """The run's name in the UI: the stage, then its setting as key=value (`mgs_calibrate objective=task target=0.9`)."""
    return " ".join([stage, *(f"{key}={value}" for key, value in (setting or {}).items())])


def run_line(run_id: str, experiment: str) -> str:
    """The line naming a stage's run in its log (RUN_LINE)."""
    return f"MLflow run {run_id} (experiment {experiment})"


def logged_run_id(log_text: str) -> str | None:
    """The run named by the last run line of a log, or None: where a log names several runs (a job resumed into the
    same log), the last one produced the outputs beside it."""
    found = RUN_LINE.findall(log_text)
    return found[-1] if found else None


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of a stage's params: equal hashes mean equal settings."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def process_tags(start_ms: int) -> dict[str, str]:
    """The tags naming the process that holds a run, and when the run started."""
    me = this_process()
    tags = {"host": me.host, "pid": str(me.pid), "started": _iso(start_ms)}
    if me.start is not None:  # tells a reused pid from the run's own process
        tags["process_start"] = str(me.start)
    if me.namespace is not None:  # tells a container's processes from the host's
        tags["pid_namespace"] = str(me.namespace)
    return tags


def _holder(run: Run) -> Writer | None:
    tags = run.data.tags
    try:
        start, namespace = (int(tags[key]) if key in tags else None for key in ("process_start", "pid_namespace"))
        return Writer(tags["host"], int(tags["pid"]), start, namespace)
    except (KeyError, ValueError):
        return None


def running_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> Iterator[Run]:
    """The runs still marked RUNNING (and matching `filter_string`), page by page."""
    query = " and ".join(["attributes.status = 'RUNNING'", *([filter_string] if filter_string else [])])
    token = None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


@dataclass(frozen=True)
class RunCheck:
    """A RUNNING run looked at: marked FAILED now (`failed`), or left RUNNING, and why."""

    run: Run
    failed: bool
    reason: str

    def __str__(self) -> str:
        action = "marked FAILED" if self.failed else "left RUNNING"
        return f"{action}: run {self.run.info.run_id} ({self.run.info.run_name}): {self.reason}"


def fail_abandoned_runs(client: MlflowClient, runs: Iterable[Run], gone_hosts: Iterable[str] = ()) -> list[RunCheck]:
    """Mark FAILED each of `runs` (RUNNING) whose process is gone from its host, or that ran on one of `gone_hosts`
    (whose jobs the caller says are over); a process on another host cannot be checked from here, so its run is
    otherwise left RUNNING. A failed run ends at its last sign of life: its latest metric, else its start."""
    gone_hosts = set(gone_hosts)
    checks = []
    for run in runs:
        holder = _holder(run)
        if holder is None:
            checks.append(RunCheck(run, False, "it does not record its host and process id (a run recorded before "
                                               "they were), so nothing tells whether it still runs"))
            continue
        process = str(holder)
        gone = holder.gone()
        if gone:
            reason = f"{process} had ended when checked at {_iso(int(time.time() * 1000))}"
        elif gone is None and holder.host in gone_hosts:
            reason = f"{process}: that host's jobs were said to be over (tidy_tracking --host {holder.host})"
        elif gone is None:
            checks.append(RunCheck(run, False, f"{process} cannot be checked from host {HOST}; once that host's jobs "
                                               f"are over, `tidy_tracking --host {holder.host}` marks it FAILED"))
            continue
        else:
            checks.append(RunCheck(run, False, f"{process} still runs"))
            continue
        last_seen = max([run.info.start_time, *(m.timestamp for m in run.data.to_proto().metrics)])
        client.set_tag(run.info.run_id, "failure", f"abandoned: {reason}")
        client.set_terminated(run.info.run_id, status="FAILED", end_time=last_seen)
        checks.append(RunCheck(run, True, reason))
    return checks


def tidy_store(gone_hosts: Iterable[str] = ()) -> list[RunCheck]:
    """Mark FAILED the abandoned RUNNING runs of every experiment in the store (fail_abandoned_runs)."""
    uri = tracking_uri()
    with _store_lock(uri):
        client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return fail_abandoned_runs(client, running_runs(client, experiments), gone_hosts) if experiments else []


@dataclass(frozen=True)
class RecordedRun:
    """A run as the store holds it, in plain values: what reporting reads of a stage run."""

    run_id: str
    status: str  # FINISHED, FAILED, RUNNING, ...
    start_time: int  # ms since the epoch
    end_time: int | None
    metrics: dict[str, float]  # the latest value of each
    tags: dict[str, str]

    @property
    def started(self) -> str:
        """When the run started, in UTC (ISO 8601)."""
        return _iso(self.start_time)

    @property
    def ended(self) -> str | None:
        return _iso(self.end_time) if self.end_time is not None else None


def runs_by_id(run_ids: Iterable[str]) -> dict[str, RecordedRun]:
    """The runs of the store at tracking_uri() with these ids, by id; an id the store does not hold is left out. A
    SQLite store that does not exist is not created: none of its runs is there."""
    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        return {}
    with _store_lock(uri):
        client = MlflowClient(uri)
    found = {}
    for run_id in dict.fromkeys(run_ids):
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue
        found[run_id] = RecordedRun(run_id, run.info.status, run.info.start_time, run.info.end_time,
                                    dict(run.data.metrics), dict(run.data.tags))
    return found


@contextmanager
def stage_run(cfg: StudyConfig, stage: str, params: dict[str, Any],
              setting: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage run, tagged with study, stage, git commit, the hash of the stage's params and
    the process holding it (host, pid, start, PID namespace).

    `setting` names the point of a sweep that this run computes (`{"method": "topk", "keep_ratio": 0.1}`);
    it goes into the run's name, the `setting` tag and one `setting.<key>` tag per value, for filtering.
    An earlier run of the same stage and setting left RUNNING by a killed process is marked FAILED first.
    """
    client, experiment_id = open_store(cfg)
    pipeline_run = os.environ.get(PIPELINE_RUN_ENV) or hashlib.sha1(f"{os.getpid()}{time.time()}".encode()).hexdigest()[:12]
    start_ms = int(time.time() * 1000)
    tags = {
        "study": cfg.name,
        "stage": stage,
        "git_commit": git_commit(),
        "params_hash": params_hash(params),
        "pipeline_run": pipeline_run,
        "mlflow.runName": run_name(stage, setting),
        **process_tags(start_ms),
    }
    if setting:
        tags["setting"] = run_name(stage, setting).partition(" ")[2]
        tags.update({f"setting.{key}": str(value) for key, value in setting.items()})
    earlier = [run for run in running_runs(client, [experiment_id], f"tags.stage = '{stage}'")
               if run.data.tags.get("setting") == tags.get("setting")]
    for check in fail_abandoned_runs(client, earlier):
        log.warning("%s", check)
    run = client.create_run(experiment_id, start_time=start_ms, tags=tags)
    handle = StageRun(run.info.run_id, client, params_hash(params))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in _flatten(params).items()])
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        handle.flush()
        client.set_terminated(run.info.run_id, status=status)
