"""MLflow tracking: stage runs carry their tags and params, and parallel stages lose no run."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from mlflow.tracking import MlflowClient

from detr_sparsity import tracking
from detr_sparsity.config import load_config
from detr_sparsity.pipeline import stage_params
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
    with tracking.stage_run(cfg, "mgs_train", stage_params(cfg, "mgs_train"), setting={"objective": "task", "target": 0.9}) as swept:
        pass
    with tracking.stage_run(cfg, "profile", stage_params(cfg, "profile")) as single:
        pass
    client = MlflowClient(store)
    swept, single = client.get_run(swept.run_id), client.get_run(single.run_id)
    assert swept.info.run_name == "mgs_train objective=task target=0.9"
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
