"""The only module that talks to MLflow: one run per stage run, tagged so runs can be found and grouped.

Default store: `sqlite:///mlflow.db` in the project root (MLflow 3's default; the file store is deprecated).
A team sets MLFLOW_TRACKING_URI to a tracking server instead. A fresh SQLite store must be created by
one process before parallel jobs open it (concurrent schema migrations lose runs), so `init_store` runs
once up front (Snakemake `onstart`); DVC runs stages one at a time, so it needs no such step.
"""

from __future__ import annotations

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
from mlflow.tracking import MlflowClient

from detr_sparsity.config import StudyConfig

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Groups the runs of one `snakemake` / `dvc repro` invocation; set by the orchestrator, else per process.
PIPELINE_RUN_ENV = "DETR_SPARSITY_PIPELINE_RUN"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def init_store(cfg: StudyConfig) -> str:
    """Create the store's schema and the study's experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(cfg.experiment)
    log.info("MLflow store %s ready, experiment %r (id %s)", tracking_uri(), cfg.experiment, experiment.experiment_id)
    return experiment.experiment_id


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
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else init_store(cfg)
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
