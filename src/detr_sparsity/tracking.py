"""The only module that talks to MLflow: one run per stage run, tagged so runs can be found and grouped.

Default store: `sqlite:///mlflow.db` in the project root (MLflow 3's default; the file store is deprecated).
A team sets MLFLOW_TRACKING_URI to a tracking server instead. Concurrent schema migrations of a fresh SQLite store
lose runs, so every process opens a SQLite store and creates the study's experiment under a file lock beside it
(`mlflow.db.lock`): stages started together on a fresh store, by any orchestrator or by hand, all land.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from detr_sparsity.config import StudyConfig

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Groups the runs of one `snakemake` / `dvc repro` invocation; set by the orchestrator, else per process.
PIPELINE_RUN_ENV = "DETR_SPARSITY_PIPELINE_RUN"


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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        # Per-step training metrics are written in batches: one transaction per 500 values, not per value.
        if step is None or len(self._pending) >= 500:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []

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
    """The run's name in the UI: the stage, then its setting as key=value (`mgs_train objective=task target=0.9`)."""
    return " ".join([stage, *(f"{key}={value}" for key, value in (setting or {}).items())])


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of a stage's params: equal hashes mean equal settings."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def stage_run(cfg: StudyConfig, stage: str, params: dict[str, Any],
              setting: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage run, tagged with study, stage, git commit and the hash of the stage's params.

    `setting` names the point of a sweep that this run computes (`{"method": "topk", "keep_ratio": 0.1}`);
    it goes into the run's name, the `setting` tag and one `setting.<key>` tag per value, for filtering.
    """
    client, experiment_id = open_store(cfg)
    pipeline_run = os.environ.get(PIPELINE_RUN_ENV) or hashlib.sha1(f"{os.getpid()}{time.time()}".encode()).hexdigest()[:12]
    tags = {
        "study": cfg.name,
        "stage": stage,
        "git_commit": git_commit(),
        "params_hash": params_hash(params),
        "pipeline_run": pipeline_run,
        "mlflow.runName": run_name(stage, setting),
    }
    if setting:
        tags["setting"] = run_name(stage, setting).partition(" ")[2]
        tags.update({f"setting.{key}": str(value) for key, value in setting.items()})
    run = client.create_run(experiment_id, tags=tags)
    handle = StageRun(run.info.run_id, client, params_hash(params))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in _flatten(params).items()])
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        handle.flush()
        client.set_terminated(run.info.run_id, status=status)
