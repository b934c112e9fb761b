"""`make ui`: the run table's URL of the study's experiment, and clear errors where there is nothing to show.
(The UI itself was checked in headless Chromium by hand: it opens on the run table.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from detr_sparsity import tracking, ui
from detr_sparsity.config import load_config
from detr_sparsity.pipeline import stage_params
from tiny_project import REPO


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_the_url_opens_the_study_experiments_run_table(store, capsys):
    cfg = load_config(REPO / "params.yaml")
    with tracking.stage_run(cfg, "evaluate", stage_params(cfg, "evaluate"), setting={"method": "dense"}):
        pass
    experiment_id = ui.study_experiment_id(store, cfg.experiment)
    assert cfg.experiment == f"{cfg.raw['tracking']['experiment_prefix']}-{cfg.name}"
    assert ui.main(["--params", str(REPO / "params.yaml"), "--port", "5123", "--print-url"]) == 0
    assert capsys.readouterr().out.strip() == \
        f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    # A tracking server needs no UI of ours: its own URL.
    assert ui.run_table_url("http://mlflow.example:5000/", "7") == \
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_a_missing_store_or_experiment_is_named(store, tmp_path, capsys):
    params = str(REPO / "params.yaml")
    assert ui.main(["--params", params, "--print-url"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # asking created no empty store
    cfg = load_config(REPO / "params.yaml", study="coco")
    tracking.init_store(cfg)
    assert ui.main(["--params", params, "--print-url"]) == 2
    err = capsys.readouterr().err
    assert f"has no experiment '{load_config(REPO / 'params.yaml').experiment}'" in err and cfg.experiment in err


def test_a_server_that_exits_is_reported():
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with code 3"):
        ui.wait_until_up("http://127.0.0.1:9", server, timeout=30)
