"""Snakemake and DVC describe one DAG, and both really run it end to end on a tiny study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from detr_sparsity.config import STAGE_SECTIONS, load_config
from detr_sparsity.evaluation.coco_eval import AP_METRICS, coco_ap
from tiny_project import REPO, TINY, make_tiny_project, run, write_params


# ---------------------------------------------------------------- the two descriptions agree

def snakemake_jobs(root: Path) -> dict[str, dict]:
    """Per job of a forced dry run: the shell command Snakemake would run, from its own output."""
    out = run(["snakemake", "-n", "-p", "--forceall", "--cores", "1"], root).stdout
    jobs = {}
    for message, command in re.findall(r"Job \d+: ([^\n]*)\n(?:Reason:[^\n]*\n)?Shell command: ([^\n]*)", out):
        jobs[message] = " ".join(command.split())
    return jobs


def snakemake_rules(root: Path) -> dict[str, object]:
    """The workflow's rules, loaded through Snakemake's API (inputs, outputs, logs, params)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(dryrun=True)) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=root / "Snakefile",
                                workdir=root)._workflow
        return {rule.name: rule for rule in workflow.rules if rule.name != "all"}


def dvc_stages(root: Path) -> dict[str, object]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def test_snakemake_and_dvc_describe_the_same_dag(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "params.yaml")
    commands = snakemake_jobs(REPO)
    rules = snakemake_rules(REPO)
    stages = dvc_stages(REPO)

    snake_commands = sorted(commands.values())
    dvc_commands = sorted(" ".join(s.cmd.split()) for s in stages.values())
    assert snake_commands == dvc_commands

    assert {name.split("@")[0] for name in stages} == set(rules)
    for name, stage in stages.items():
        rule_name, _, item = name.partition("@")
        rule = rules[rule_name]

        def expand(paths):
            return {p.replace("{method}", item) for p in paths}

        inputs = [p for key, value in rule.input._allitems() if key != "code"
                  for p in (value if isinstance(value, list) else [value])]
        code_dirs = {str(Path(*Path(f).parts[:3])) for f in rule.input.code}
        dvc_deps = {d.def_path for d in stage.deps if type(d).__name__ == "Dependency"}
        assert dvc_deps == expand(inputs) | code_dirs, name

        dvc_outs = {o.def_path for o in stage.outs}
        assert dvc_outs == expand(list(rule.output) + list(rule.log)), name

        (params_dep,) = [d for d in stage.deps if type(d).__name__ == "ParamsDependency"]
        expected = {"study", "seed"} | {f"studies.{cfg.name}.{s}" for s in STAGE_SECTIONS[rule_name]}
        assert set(params_dep.params) == expected, name
        assert set(rule.params.settings) == {"study", "seed", *STAGE_SECTIONS[rule_name]}, name


def test_snakemake_lint_is_clean():
    out = run(["snakemake", "--lint"], REPO)
    assert "Congratulations" in out.stdout + out.stderr


# ---------------------------------------------------------------- end to end on the tiny study

def check_summary(root: Path) -> list[dict]:
    """summary.json has the dense row, and its AP is exactly what COCOeval gives on its own files."""
    rows = json.loads((root / "results/synthetic/summary.json").read_text())
    assert [r["method"] for r in rows] == ["dense"]
    row = rows[0]
    recomputed = coco_ap(root / row["annotations"], root / row["detections"])
    assert {k: row[k] for k in AP_METRICS} == recomputed
    assert 0.0 <= row["natural_sparsity"]["overall"] <= 1.0
    assert row["ffn_flops"]["dense"] > 0 and row["total_flops"]["dense"] > row["ffn_flops"]["dense"]
    detections = json.loads((root / row["detections"]).read_text())
    # every query of every val image is scored
    assert len(detections) == TINY["data"]["splits"]["val"] * TINY["model"]["architecture"]["num_queries"]
    return rows


def mlflow_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("detr-sparsity-synthetic")
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_snakemake_runs_the_study_and_reruns_only_what_changed(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    run(["snakemake", "--cores", "2"], root)
    rows = check_summary(root)

    runs = mlflow_runs(root)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == {"data", "model", "evaluate", "summary"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert rows[0]["mlflow_run_id"] == by_stage["evaluate"].info.run_id
    for r in runs:
        assert {"study", "stage", "git_commit", "params_hash", "pipeline_run"} <= set(r.data.tags)
    assert len(set(r.data.tags["pipeline_run"] for r in runs)) == 1
    assert "loss" in by_stage["model"].data.metrics
    assert by_stage["evaluate"].data.metrics["AP"] == rows[0]["AP"]
    for stage in ("data", "model", "evaluate-dense", "summary"):
        assert (root / f"results/synthetic/logs/{stage}.log").stat().st_size > 0

    again = run(["snakemake", "-n", "--cores", "2"], root)
    assert "Nothing to be done" in again.stdout + again.stderr
    # Snakemake's onsuccess recorded its outputs in dvc.lock: DVC agrees that nothing is left to run.
    assert "up to date" in run(["dvc", "status"], root).stdout
    repro = run(["dvc", "repro"], root).stdout
    assert "Running stage" not in repro

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["evaluate"]["batch_size"] = 2
    write_params(root, params)
    planned = run(["snakemake", "-n", "--cores", "2"], root).stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", planned.split("Job stats:")[1].split("\n\n")[0], re.M))
    assert jobs == {"evaluate": "1", "summary": "1", "all": "1", "total": "3"}


@pytest.mark.slow
def test_dvc_repro_runs_the_study_and_then_has_nothing_to_do(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    run(["dvc", "repro"], root)
    check_summary(root)
    assert {r.data.tags["stage"] for r in mlflow_runs(root)} == {"data", "model", "evaluate", "summary"}
    assert (root / "dvc.lock").exists()

    again = run(["dvc", "repro"], root)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    status = run(["dvc", "status"], root)
    assert "up to date" in status.stdout

    metrics = run(["dvc", "metrics", "show", "--json"], root).stdout
    assert "AP50" in metrics
