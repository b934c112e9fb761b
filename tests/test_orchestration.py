"""Snakemake and DVC describe one DAG, and both really run it end to end on a tiny study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from detr_sparsity.config import STAGE_KEYS, STAGE_SECTIONS, load_config
from detr_sparsity.evaluation.coco_eval import AP_METRICS, coco_ap
from tiny_project import REPO, TINY, TINY_SWEEPS, make_tiny_project, run, write_params


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


# A wildcard in a Snakemake path: {name} or, with the rule's constraint attached, {name,regex}.
WILDCARD = re.compile(r"\{(\w+)(?:,([^{}]*))?\}")


def rule_wildcards(rule, dvc_outs: set[str]) -> dict[str, str]:
    """The wildcard values of the rule's job that makes `dvc_outs` (read off its first output pattern)."""
    pattern = str(rule.output[0])
    parts, last = [], 0
    for found in WILDCARD.finditer(pattern):
        parts += [re.escape(pattern[last:found.start()]), f"(?P<{found[1]}>{found[2] or '[^/]+'})"]
        last = found.end()
    regex = "".join(parts) + re.escape(pattern[last:])
    for out in dvc_outs:
        found = re.fullmatch(regex, out)
        if found:
            return found.groupdict()
    raise AssertionError(f"no DVC out of {sorted(dvc_outs)} matches rule {rule.name}'s output {pattern}")


def fill(path, wildcards: dict[str, str]) -> str:
    return WILDCARD.sub(lambda found: wildcards[found[1]], str(path))


def covers(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


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
        rule = rules[name.partition("@")[0]]
        dvc_outs = {o.def_path for o in stage.outs}
        wildcards = rule_wildcards(rule, dvc_outs)

        def expand(paths):
            return {fill(p, wildcards) for p in paths}

        assert dvc_outs == expand(list(rule.output) + list(rule.log)), name

        inputs = expand(p for key, value in rule.input._allitems() if key != "code"
                        for p in (value if isinstance(value, list) else [value]))
        code_dirs = {str(Path(*Path(f).parts[:3])) for f in rule.input.code}
        dvc_deps = {d.def_path for d in stage.deps if type(d).__name__ == "Dependency"}
        # A DVC dep may be a directory holding several Snakemake inputs (the summary's row files).
        assert all(any(covers(dep, p) for dep in dvc_deps) for p in inputs | code_dirs), name
        assert all(any(covers(dep, p) for p in inputs | code_dirs) for dep in dvc_deps), name

        (params_dep,) = [d for d in stage.deps if type(d).__name__ == "ParamsDependency"]
        sections, keys = STAGE_SECTIONS[rule.name], STAGE_KEYS.get(rule.name, [])
        expected = {"study", "seed", *keys} | {f"studies.{cfg.name}.{s}" for s in sections}
        assert set(params_dep.params) == expected, name
        assert set(rule.params.settings) == {"study", "seed", *sections, *keys}, name


def test_snakemake_lint_is_clean():
    out = run(["snakemake", "--lint"], REPO)
    assert "Congratulations" in out.stdout + out.stderr


# ---------------------------------------------------------------- end to end on the tiny study

STAGES = {"data", "model", "evaluate", "profile", "masking", "sibs", "mgs_cache", "mgs_train", "mgs_evaluate",
          "summary", "benchmark"}


def row_key(row: dict) -> tuple:
    setting = row["setting"] or {}
    point = setting.get("target", setting.get("keep_ratio", setting.get("threshold")))
    return (row["method"], point, setting.get("scope", setting.get("objective")))


def check_summary(root: Path) -> dict[tuple, dict]:
    """summary.json holds every configured row; each AP is exactly what COCOeval gives on the row's own files;
    the sanity points reproduce dense exactly."""
    rows = json.loads((root / "results/synthetic/summary.json").read_text())
    scopes = ["all", "encoder.0", "decoder.0"]
    keeps, thresholds = TINY_SWEEPS["masking"]["keep_ratios"], TINY_SWEEPS["sibs"]["thresholds"]
    expected = [("dense", None, None),
                *((method, keep, scope) for method in ("topk", "random") for keep in keeps for scope in scopes),
                *(("sibs", threshold, None) for threshold in thresholds),
                *(("mgs", target, objective) for objective in TINY_SWEEPS["mgs"]["objectives"]
                  for target in TINY_SWEEPS["mgs"]["targets"])]
    assert [row_key(r) for r in rows] == expected
    by_key = {row_key(r): r for r in rows}
    for row in rows:
        recomputed = coco_ap(root / row["annotations"], root / row["detections"])
        assert {k: row[k] for k in AP_METRICS} == recomputed, row_key(row)
        detections = json.loads((root / row["detections"]).read_text())
        # every query of every val image is scored
        assert len(detections) == TINY["data"]["splits"]["val"] * TINY["model"]["architecture"]["num_queries"]
        assert row["ffn_flops"]["dense"] > 0 and row["total_flops"]["dense"] > row["ffn_flops"]["dense"]

    dense = by_key[("dense", None, None)]
    assert 0.0 <= dense["natural_sparsity"]["overall"] <= 1.0
    for same in (("topk", 1.0, "all"), ("random", 1.0, "all"), ("sibs", 0.0, None)):
        assert {k: by_key[same][k] for k in AP_METRICS} == {k: dense[k] for k in AP_METRICS}, same
        assert by_key[same]["induced_sparsity"]["overall"] == 0.0
        assert (root / by_key[same]["detections"]).read_bytes() == (root / dense["detections"]).read_bytes()
    return by_key


def check_counts_independently(root: Path, by_key: dict[tuple, dict]) -> None:
    """Induced sparsity and FFN FLOPs of the rows, recounted from the saved model, the profile and the
    closed form 2 x (tokens x 2 d H) FLOPs of a dense FFN block."""
    from safetensors.torch import load_file

    from detr_sparsity.evaluation.evaluate import evaluation_split
    from detr_sparsity.models.load import load_detr

    cfg = load_config(root / "params.yaml")
    model = load_detr(root / "results/synthetic/model")
    d, hidden = model.config.d_model, model.config.encoder_ffn_dim
    batch = next(iter(evaluation_split(cfg, root / "results/synthetic/data").loader))
    with torch.no_grad():
        _features, mask = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])[-1]
    tokens = {"encoder.0": int(mask[0].sum()), "decoder.0": model.config.num_queries}  # per image, no padding

    def ffn_flops(kept: dict[str, float], fc1_skipped: bool) -> float:
        # per block: fc2 always does kept x d MACs per token; fc1 does kept x d when it skips, else H x d
        return sum(2 * t * d * (kept[b] + (kept[b] if fc1_skipped else hidden)) for b, t in tokens.items())

    dense = by_key[("dense", None, None)]
    assert dense["ffn_flops"]["dense"] == pytest.approx(ffn_flops({b: hidden for b in tokens}, True), rel=1e-12)

    firing = load_file(str(root / "results/synthetic/profile/neurons.safetensors"))
    threshold = TINY_SWEEPS["sibs"]["thresholds"][-1]
    kept = {b: int((firing[f"{b}.firing_frequency"] >= threshold).sum()) for b in tokens}
    row = by_key[("sibs", threshold, None)]
    assert row["induced_sparsity"]["per_block"] == pytest.approx({b: 1 - kept[b] / hidden for b in tokens}, abs=1e-12)
    assert row["ffn_flops"]["as_run"] == pytest.approx(ffn_flops(kept, True), rel=1e-12)
    assert row["shrunk_ffn"]["kept_neurons"] == kept and row["shrunk_ffn"]["label_mismatches"] == 0

    keep = TINY_SWEEPS["masking"]["keep_ratios"][-1]
    k = round(keep * hidden)
    for method, fc1_skipped in (("topk", False), ("random", True)):
        row = by_key[(method, keep, "all")]
        assert row["induced_sparsity"]["per_block"] == pytest.approx({b: 1 - k / hidden for b in tokens}, abs=1e-12)
        assert row["ffn_flops"]["as_run"] == pytest.approx(ffn_flops({b: k for b in tokens}, fc1_skipped), rel=1e-12)
        alone = by_key[(method, keep, "encoder.0")]
        assert alone["induced_sparsity"]["per_block"] == {"encoder.0": pytest.approx(1 - k / hidden), "decoder.0": 0.0}

    # MGS: both matrices of a skipped neuron are saved, and each token pays its gate, d x H / G MACs.
    row = by_key[("mgs", TINY_SWEEPS["mgs"]["targets"][0], "task")]
    groups = hidden // TINY_SWEEPS["mgs"]["group_size"]
    kept = {b: (1 - row["induced_sparsity"]["per_block"][b]) * hidden for b in tokens}
    gate_flops = sum(2 * t * d * groups for t in tokens.values())
    assert row["ffn_flops"]["as_run"] == pytest.approx(ffn_flops(kept, True) + gate_flops, rel=1e-9)


def mlflow_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("detr-sparsity-synthetic")
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_snakemake_runs_the_study_and_reruns_only_what_changed(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    run(["snakemake", "--cores", "2"], root)
    by_key = check_summary(root)
    check_counts_independently(root, by_key)

    runs = mlflow_runs(root)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == STAGES
    assert all(r.info.status == "FINISHED" for r in runs)
    stage_of_run = {r.info.run_id: r.data.tags["stage"] for r in runs}
    for key, row in by_key.items():
        assert stage_of_run[row["mlflow_run_id"]] == {"dense": "evaluate", "topk": "masking", "random": "masking",
                                                      "sibs": "sibs", "mgs": "mgs_evaluate"}[key[0]]
    assert by_stage["profile"].data.metrics["natural_sparsity"] == pytest.approx(
        json.loads((root / "results/synthetic/profile/profile.json").read_text())["natural_sparsity"]["overall"])
    for r in runs:
        assert {"study", "stage", "git_commit", "params_hash", "pipeline_run"} <= set(r.data.tags)
    assert len(set(r.data.tags["pipeline_run"] for r in runs)) == 1
    assert "loss" in by_stage["model"].data.metrics
    assert by_stage["evaluate"].data.metrics["AP"] == by_key[("dense", None, None)]["AP"]
    # Gate training logs every step: overall and per-block sparsity, losses, the multiplier.
    mgs_row = by_key[("mgs", 0.5, "task")]
    assert stage_of_run[mgs_row["training"]["mlflow_run_id"]] == "mgs_train"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    steps = TINY["mgs"]["training"]["steps"]
    for metric in ("induced_sparsity", "induced_sparsity.encoder.0", "objective_loss", "multiplier"):
        history = client.get_metric_history(mgs_row["training"]["mlflow_run_id"], metric)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), metric
    for stage in ("data", "model", "evaluate-dense", "profile", "masking-topk-0.25", "sibs-0.2", "mgs-cache",
                  "mgs-train-task-0.5", "mgs-evaluate-distillation-0.5", "summary", "benchmark"):
        assert (root / f"results/synthetic/logs/{stage}.log").stat().st_size > 0

    again = run(["snakemake", "-n", "--cores", "2"], root)
    assert "Nothing to be done" in again.stdout + again.stderr
    # Snakemake's onsuccess recorded its outputs in dvc.lock: DVC agrees that nothing is left to run.
    assert "up to date" in run(["dvc", "status"], root).stdout
    repro = run(["dvc", "repro"], root).stdout
    assert "Running stage" not in repro

    # A longer sweep runs only its new points (and the summary that gathers them; the benchmark times every
    # SIBS threshold).
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["masking"]["keep_ratios"].append(0.5)
    params["sibs"]["thresholds"].append(0.3)
    write_params(root, params)
    assert planned_jobs(root) == {"masking": "2", "sibs": "1", "summary": "1", "benchmark": "1", "all": "1",
                                  "total": "6"}
    # A setting every evaluation reads reruns all of them, and nothing upstream.
    params["studies"]["synthetic"]["evaluate"]["batch_size"] = 2
    write_params(root, params)
    assert planned_jobs(root) == {"evaluate": "1", "profile": "1", "masking": "6", "sibs": "3", "mgs_evaluate": "2",
                                  "summary": "1", "benchmark": "1", "all": "1", "total": "16"}
    # A new MGS target trains and evaluates only that target, per objective; the cached front end is reused.
    params["mgs"]["targets"].append(0.75)
    write_params(root, params)
    assert planned_jobs(root) == {"evaluate": "1", "profile": "1", "masking": "6", "sibs": "3", "mgs_train": "2",
                                  "mgs_evaluate": "4", "summary": "1", "benchmark": "1", "all": "1", "total": "20"}


def planned_jobs(root: Path) -> dict[str, str]:
    planned = run(["snakemake", "-n", "--cores", "2"], root).stdout
    return dict(re.findall(r"^(\w+)\s+(\d+)$", planned.split("Job stats:")[1].split("\n\n")[0], re.M))


@pytest.mark.slow
def test_dvc_repro_runs_the_study_and_then_has_nothing_to_do(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    run(["dvc", "repro"], root)
    by_key = check_summary(root)
    assert {r.data.tags["stage"] for r in mlflow_runs(root)} == STAGES
    assert (root / "dvc.lock").exists()

    again = run(["dvc", "repro"], root)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    status = run(["dvc", "status"], root)
    assert "up to date" in status.stdout

    metrics = run(["dvc", "metrics", "show", "--json"], root).stdout
    shown = next(iter(json.loads(metrics).values()))["data"]
    assert shown["results/synthetic/evaluate/dense/row.json"]["data"]["AP50"] == by_key[("dense", None, None)]["AP50"]
    masking = shown["results/synthetic/masking/topk-0.25/rows.json"]["data"]
    assert masking["encoder.0"]["AP"] == by_key[("topk", 0.25, "encoder.0")]["AP"]

    # A longer sweep: DVC sees only the new points (and the summary) as changed.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["masking"]["keep_ratios"].append(0.5)
    write_params(root, params)
    changed = json.loads(run(["dvc", "status", "--json"], root).stdout)
    assert set(changed) == {"masking@topk-0.5", "masking@random-0.5", "summary"}
    mgs = shown["results/synthetic/mgs/distillation/0.5/row.json"]["data"]
    assert mgs["AP"] == by_key[("mgs", 0.5, "distillation")]["AP"] and mgs["method"] == "mgs"
