"""MLflow tracking: stage runs carry their tags and params, and parallel stages lose no run."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from mlflow.tracking import MlflowClient

from detr_sparsity import tracking
from detr_sparsity.config import load_config
from tiny_project import REPO


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _one_stage_run(uri: str, index: int) -> str:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = load_config(REPO / "params.yaml")
    with tracking.stage_run(cfg, "evaluate", setting=f"job{index}") as run:
        for step in range(20):
            run.log_metrics({"value": step * index}, step=step)
        run.log_metrics({"final": float(index)})
    return run.run_id


def test_stage_run_records_tags_params_and_metrics(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)
    with tracking.stage_run(cfg, "model") as run:
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
    got = MlflowClient(store).get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["stage"] == "model" and got.data.tags["study"] == "synthetic"
    assert got.data.tags["params_hash"] == cfg.params_hash("model")
    assert got.data.params["model.architecture.d_model"] == "128"
    history = MlflowClient(store).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_failed_stage_is_marked_failed(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "data") as run:
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run.run_id).info.status == "FAILED"


def test_parallel_stage_runs_after_init_all_land(store):
    cfg = load_config(REPO / "params.yaml")
    tracking.init_store(cfg)  # what Snakemake's onstart does before any job
    with mp.get_context("spawn").Pool(8) as pool:
        run_ids = pool.starmap(_one_stage_run, [(store, i) for i in range(8)])
    client = MlflowClient(store)
    runs = [client.get_run(r) for r in run_ids]
    assert len(set(run_ids)) == 8
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["final"] for r in runs) == [float(i) for i in range(8)]
    assert all(len(client.get_metric_history(r.info.run_id, "value")) == 20 for r in runs)
