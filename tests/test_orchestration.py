"""The pipeline is declared once and both orchestrators follow it: dvc.yaml is generated from the declaration,
Snakemake's rules and DVC's stages describe one DAG, code dependencies follow the import graph, and one real run of
the tiny study under Snakemake is then checked by DVC (nothing to do; a changed param reruns exactly its stages)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from detr_sparsity.config import load_config
from detr_sparsity.evaluation.coco_eval import AP_METRICS, coco_ap
from detr_sparsity.pipeline import PIPELINE, STAGES, code_deps, dvc_yaml, stage_params
from detr_sparsity.reporting.paper import toolchain_missing
from tiny_project import REPO, TINY, TINY_SWEEPS, make_tiny_project, mlflow_server, run, write_params

PACKAGE = REPO / "src" / "detr_sparsity"
# The paper stage runs where a LaTeX toolchain is installed (CI installs one); elsewhere every other stage runs.
LATEX = toolchain_missing() is None
RUN_STAGES = set(PIPELINE) - (set() if LATEX else {"paper"})


# ---------------------------------------------------------------- one declaration, two orchestrators

def test_dvc_yaml_is_what_the_declaration_generates():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "run `python -m detr_sparsity dvc_yaml`"
    checked = run(["python", "-m", "detr_sparsity", "dvc_yaml", "--check"], REPO)
    assert "is current" in checked.stdout


def snakemake_jobs(root: Path) -> dict[str, str]:
    """Per job of a forced dry run of the whole DAG (the paper too, with or without LaTeX): its shell command."""
    out = run(["snakemake", "-n", "-p", "--forceall", "--cores", "1", "all", "paper/synthetic/main.pdf"], root).stdout
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

    # Every job of each, the paper's included, with the same command.
    assert sorted(commands.values()) == sorted(" ".join(s.cmd.split()) for s in stages.values())
    assert {name.split("@")[0] for name in stages} == set(rules) == set(PIPELINE)
    for name, stage in stages.items():
        rule = rules[name.partition("@")[0]]
        dvc_outs = {o.def_path for o in stage.outs}
        wildcards = rule_wildcards(rule, dvc_outs)

        def expand(paths):
            return {fill(p, wildcards) for p in paths}

        assert dvc_outs == expand(list(rule.output) + list(rule.log)), name
        inputs = expand(p for _key, value in rule.input._allitems()
                        for p in (value if isinstance(value, list) else [value]))
        dvc_deps = {d.def_path for d in stage.deps if type(d).__name__ == "Dependency"}
        # A DVC dep may be a directory holding several Snakemake inputs (the summary's row files).
        assert all(any(covers(dep, p) for dep in dvc_deps) for p in inputs), name
        assert all(any(covers(dep, p) for p in inputs) for dep in dvc_deps), name
        assert set(code_deps(rule.name)) <= inputs and set(code_deps(rule.name)) <= dvc_deps, name

        (params_dep,) = [d for d in stage.deps if type(d).__name__ == "ParamsDependency"]
        spec = PIPELINE[rule.name]
        expected = {"study", "seed", *spec.keys} | {f"studies.{cfg.name}.{s}" for s in spec.sections}
        assert set(params_dep.params) == expected, name
        assert rule.params.settings == stage_params(cfg, rule.name), name


def test_snakemake_lint_is_clean():
    out = run(["snakemake", "--lint"], REPO)
    assert "Congratulations" in out.stdout + out.stderr


# ---------------------------------------------------------------- code dependencies from the import graph

def package_imports(file: Path) -> set[str]:
    """The detr_sparsity modules a source file names in its imports, read independently of the pipeline's walker."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.startswith("detr_sparsity")}


def test_a_stage_depends_on_what_it_imports_indirectly():
    # stages/evaluate.py imports evaluation.evaluate, which imports data.dataset (the collate function) and
    # sparsity.ffn: an edit to either can change what the evaluation computes.
    deps = code_deps("evaluate")
    for module in ("stages/evaluate.py", "evaluation/evaluate.py", "data/dataset.py", "sparsity/ffn.py",
                   "models/load.py", "config.py"):
        assert f"src/detr_sparsity/{module}" in deps, module
    # ... and on nothing it does not import
    for module in ("cli.py", "pipeline.py", "mgs/training.py", "reporting/figures.py", "stages/masking.py"):
        assert f"src/detr_sparsity/{module}" not in deps, module
    assert "src/detr_sparsity/pipeline.py" in code_deps("summary")  # it asks the declaration for its row files


def test_libraries_import_no_stage_and_no_entry_point():
    for file in PACKAGE.rglob("*.py"):
        relative = file.relative_to(PACKAGE).as_posix()
        # the entry point: the CLI, `python -m`, and the job server that runs the CLI's jobs in its children
        if relative.startswith("stages/") or relative in ("cli.py", "__main__.py", "job_server.py", "sharing.py"):
            continue
        imported = package_imports(file)
        assert not any(m.startswith("detr_sparsity.stages") for m in imported), relative
        assert "detr_sparsity.cli" not in imported, relative


def test_every_stage_module_has_its_entry_point():
    for stage in STAGES:
        module = PACKAGE / "stages" / f"{stage.name}.py"
        tree = ast.parse(module.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run_stage" for n in tree.body), stage.name


# ---------------------------------------------------------------- end to end on the tiny study

def row_key(row: dict) -> tuple:
    """(method, point, which): an MGS row by objective (every block gated) or `single:<block>` (one block alone)."""
    setting = row["setting"] or {}
    point = setting.get("target", setting.get("keep_ratio", setting.get("threshold")))
    if row["method"] == "mgs":
        which = {"all": setting["objective"], "single": f"single:{setting['scope']}", "paper": "paper"}
        return ("mgs", point, which[setting["protocol"]])
    return (row["method"], point, setting.get("scope"))


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
                  for target in TINY_SWEEPS["mgs"]["targets"]),
                *(("mgs", target, f"single:{block}") for target in TINY_SWEEPS["mgs"]["single_block_targets"]
                  for block in scopes[1:]),
                ("mgs", None, "paper")]
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
    row = by_key[("mgs", TINY_SWEEPS["mgs"]["targets"][0], "group_activity")]
    groups = hidden // TINY_SWEEPS["mgs"]["group_size"]
    kept = {b: (1 - row["induced_sparsity"]["per_block"][b]) * hidden for b in tokens}
    gate_flops = sum(2 * t * d * groups for t in tokens.values())
    assert row["ffn_flops"]["as_run"] == pytest.approx(ffn_flops(kept, True) + gate_flops, rel=1e-9)


def markdown_rows(path: Path, part: int = 0) -> list[list[str]]:
    """The header and body rows of one tabular of a generated table (T3 and T4 have several)."""
    tabulars = [block for block in path.read_text().split("\n\n") if block.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in tabulars[part].splitlines() if line.startswith("| ") and not line.startswith("| **")]


def check_paper_outputs(root: Path, by_key: dict[tuple, dict]) -> None:
    """Figures and tables exist, carry the study's name, and every number checked equals summary.json's."""
    figures = root / "paper/synthetic/figures"
    for name in ("f1_natural_sparsity", "f2_topk_vs_random", "f3_flops_vs_ap", "f4_gate_training",
                 "f5_mgs_per_block"):
        assert (figures / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
        assert (figures / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    assert "synthetic study" in (figures / "captions.tex").read_text()

    tables = root / "results/synthetic/tables"
    dense = by_key[("dense", None, None)]
    header, values = markdown_rows(tables / "t1_dense.md")[:2]
    assert dict(zip(header, values))["AP50"] == f"{dense['AP50']:.3f}"
    t3 = markdown_rows(tables / "t3_mgs.md")
    columns = t3[0]
    objectives = TINY_SWEEPS["mgs"]["objectives"]
    body = [dict(zip(columns, row)) for row in t3[1:]]
    assert len(body) == len(objectives) * len(TINY_SWEEPS["mgs"]["targets"])
    for objective, cells in zip(objectives, body):  # one target: one row per objective, in order
        row = by_key[("mgs", float(cells["target"]), objective)]
        assert cells["AP"] == f"{row['AP']:.3f}" and cells["AP50"] == f"{row['AP50']:.3f}"
        assert cells["achieved (%)"] == f"{100 * row['induced_sparsity']['overall']:.1f}"
        assert cells["encoder.0 (%)"] == f"{100 * row['induced_sparsity']['per_block']['encoder.0']:.1f}"
        assert cells["FFN FLOPs (x dense)"] == f"{row['ffn_flops']['as_run'] / row['ffn_flops']['dense']:.2f}x"
    t2 = markdown_rows(tables / "t2_sibs.md")
    for cells in (dict(zip(t2[0], row)) for row in t2[1:]):
        assert cells["AP"] == f"{by_key[('sibs', float(cells['threshold tau']), None)]['AP']:.3f}"
    for name in ("t0_claims", "t1_dense", "t2_sibs", "t3_mgs", "t4_matched", "t6_cost", "study"):
        assert (root / f"paper/synthetic/tables/{name}.tex").stat().st_size > 0, name
    assert "\\toprule" in (root / "paper/synthetic/tables/t3_mgs.tex").read_text()

    metrics = json.loads((root / "results/synthetic/metrics.json").read_text())
    assert metrics["mgs"]["group_activity"]["target=0.5"]["AP"] == by_key[("mgs", 0.5, "group_activity")]["AP"]
    assert metrics["mgs"]["group_activity-single"]["target=0.5"]["decoder.0"]["AP"] == \
        by_key[("mgs", 0.5, "single:decoder.0")]["AP"]
    assert metrics["dense"]["AP"] == dense["AP"]
    if LATEX:
        assert (root / "paper/synthetic/main.pdf").read_bytes().startswith(b"%PDF")


def check_cost(root: Path) -> None:
    """cost.json reports on every stage before it, with as many jobs per stage as the stage left log files (recounted
    here from the logs directory), each job's run FINISHED; T6 shows its total."""
    cost = json.loads((root / "results/synthetic/benchmark/cost.json").read_text())
    reported = [name for name in PIPELINE if name not in ("cost", "figures", "tables", "paper")]
    assert [entry["stage"] for entry in cost["stages"]] == reported
    logs = [f.name for f in (root / "results/synthetic/logs").glob("*.log")]
    for entry in cost["stages"]:
        recount = sum(name == f"{entry['stage']}.log" or name.startswith(f"{entry['stage']}-") for name in logs)
        assert entry["jobs"] == recount > 0, entry["stage"]
    assert cost["total"]["jobs"] == len(cost["jobs"]) == sum(entry["jobs"] for entry in cost["stages"])
    assert {job["status"] for job in cost["jobs"]} == {"FINISHED"}
    assert sum(entry["share"] for entry in cost["stages"]) == pytest.approx(1.0)
    header, *rows = markdown_rows(root / "results/synthetic/tables/t6_cost.md")
    assert [row[0] for row in rows] == [*reported, "all stages"]
    assert dict(zip(header, rows[-1]))["jobs"] == str(cost["total"]["jobs"])


def mlflow_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("detr-sparsity-synthetic")
    return client.search_runs([experiment.experiment_id])


# ---------------------------------------------------------------- MLflow, read back through its REST API

def rest(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """One call of the tracking server's REST API: POST `body` as JSON, or GET with `query`."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(f"{address}?{urllib.parse.urlencode(query)}")
    else:
        request = urllib.request.Request(address, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def server_runs(url: str, experiment_ids: list[str]) -> list[dict]:
    """Every run of the experiments: id, name, status, tags and latest metrics, page by page."""
    runs, token = [], None
    while True:
        page = rest(url, "runs/search", {"experiment_ids": experiment_ids, "max_results": 100,
                                         **({"page_token": token} if token else {})})
        for found in page.get("runs", []):
            data = found["data"]
            runs.append({"id": found["info"]["run_id"], "name": found["info"]["run_name"],
                         "status": found["info"]["status"], "experiment_id": found["info"]["experiment_id"],
                         "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
                         "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])}})
        token = page.get("next_page_token")
        if not token:
            return runs


def artifact_files(url: str, run_id: str) -> set[str]:
    return {f["path"] for f in rest(url, "artifacts/list", run_id=run_id).get("files", [])}


def metric_steps(url: str, run_id: str, metric: str) -> list[int]:
    return sorted(m["step"] for m in rest(url, "metrics/get-history", run_id=run_id, metric_key=metric)["metrics"])


# What each stage logs as artifacts (a stage not listed here must log at least one).
ARTIFACTS = {"data": {"splits.json"}, "model": {"config.json", "model_info.json"}, "evaluate": {"row.json"},
             "profile": {"profile.json"}, "masking": {"rows.json"}, "sibs": {"row.json"},
             "mgs_cache": set(),  # its outputs are the cached front end and block inputs (hundreds of MB on a study)
             "mgs_local": {"training.json"}, "mgs_train": {"trained"}, "mgs_calibrate": {"training.json"},
             "mgs_evaluate": {"row.json"},
             "mgs_single": {"rows.json"}, "mgs_paper_setting": {"row.json"}, "summary": {"summary.json", "metrics.json", "comparisons.json"},
             "cost": {"cost.json"}, "figures": {"figures", "plots"}, "tables": {"tables", "paper_tables"},
             "paper": {"paper"}}


def expected_run_names(stage: str) -> list[str]:
    """The runs a stage's jobs make on the tiny study: its name, then the point of the sweep as key=value."""
    masking, sibs, mgs = TINY_SWEEPS["masking"], TINY_SWEEPS["sibs"], TINY_SWEEPS["mgs"]
    sweeps = {
        "evaluate": ["method=dense"],
        "masking": [f"method={m} keep_ratio={k}" for m in masking["methods"] for k in masking["keep_ratios"]],
        "sibs": [f"threshold={t}" for t in sibs["thresholds"]],
        "mgs_calibrate": [f"objective={o} target={t}" for o in mgs["objectives"] for t in mgs["targets"]],
        "mgs_evaluate": [f"objective={o} target={t}" for o in mgs["objectives"] for t in mgs["targets"]],
        "mgs_single": [f"target={t}" for t in mgs["single_block_targets"]],
    }
    return sorted(f"{stage} {setting}" for setting in sweeps[stage]) if stage in sweeps else [stage]


def check_mlflow_server(url: str, root: Path, jobs: dict[str, int], by_key: dict[tuple, dict]) -> None:
    """The tracking server holds one experiment for the study, and in it one finished run per job of the
    pipeline, named after stage and setting, grouped by one pipeline_run tag, with its metrics and artifacts."""
    experiments = rest(url, "experiments/search", {"max_results": 1000})["experiments"]
    study = [e for e in experiments if e["name"] == "detr-sparsity-synthetic"]
    assert len(study) == 1
    runs = server_runs(url, [e["experiment_id"] for e in experiments])
    assert {r["experiment_id"] for r in runs} == {study[0]["experiment_id"]}

    assert Counter(r["tags"]["stage"] for r in runs) == jobs
    assert all(r["status"] == "FINISHED" for r in runs)
    for stage in jobs:
        assert sorted(r["name"] for r in runs if r["tags"]["stage"] == stage) == expected_run_names(stage), stage
    for r in runs:
        assert {"study", "stage", "git_commit", "params_hash", "pipeline_run"} <= set(r["tags"])
        assert r["tags"].get("setting", "") == r["name"].partition(" ")[2]
    assert len({r["tags"]["pipeline_run"] for r in runs}) == 1

    by_stage = {r["tags"]["stage"]: r for r in runs}
    stage_of_run = {r["id"]: r["tags"]["stage"] for r in runs}
    for key, row in by_key.items():
        which = key[2] if key[0] == "mgs" else ""
        mgs_stage = ("mgs_single" if which.startswith("single:") else
                     "mgs_paper_setting" if which == "paper" else "mgs_evaluate")
        assert stage_of_run[row["mlflow_run_id"]] == {"dense": "evaluate", "topk": "masking", "random": "masking",
                                                      "sibs": "sibs", "mgs": mgs_stage}[key[0]]
    # Every evaluation has its AP metrics (per scope for masking), equal to its row's.
    metrics_of_run = {r["id"]: r["metrics"] for r in runs}
    for key, row in by_key.items():
        suffix = (f".{key[2]}" if key[0] in ("topk", "random") else
                  f".{key[2].removeprefix('single:')}" if key[0] == "mgs" and key[2].startswith("single:") else "")
        assert {k: metrics_of_run[row["mlflow_run_id"]][k + suffix] for k in AP_METRICS} == \
            {k: row[k] for k in AP_METRICS}, key
    assert by_stage["profile"]["metrics"]["natural_sparsity"] == pytest.approx(
        json.loads((root / "results/synthetic/profile/profile.json").read_text())["natural_sparsity"]["overall"])
    assert "loss" in by_stage["model"]["metrics"]
    # Gate training logs every step of each end-to-end objective: overall and per-block sparsity, losses, the
    # multiplier.
    steps = list(range(1, TINY["mgs"]["training"]["steps"] + 1))
    for metric in ("induced_sparsity", "induced_sparsity.encoder.0", "objective_loss", "multiplier"):
        assert metric_steps(url, by_stage["mgs_train"]["id"], f"distillation.{metric}") == steps, metric
    mgs_row = by_key[("mgs", 0.5, "distillation")]
    assert stage_of_run[mgs_row["training"]["mlflow_run_id"]] == "mgs_calibrate"
    assert stage_of_run[mgs_row["training"]["trained_by"]] == "mgs_train"

    for r in runs:
        logged = artifact_files(url, r["id"])
        if r["tags"]["stage"] in ARTIFACTS:
            assert logged == ARTIFACTS[r["tags"]["stage"]], r["name"]
        else:
            assert logged, f"{r['name']} logged no artifact"
    # An artifact read back through the server is the stage's output, byte for byte.
    query = urllib.parse.urlencode({"path": "row.json", "run_uuid": by_stage["evaluate"]["id"]})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as response:
        assert response.read() == (root / "results/synthetic/evaluate/dense/row.json").read_bytes()




@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The tiny study run once under Snakemake (parallel jobs, against an `mlflow server`: the team setup); the tests
    below check it, then rerun parts of it with Snakemake and DVC."""
    tmp = tmp_path_factory.mktemp("study")
    root = make_tiny_project(tmp / "project")
    jobs = {stage: int(n) for stage, n in planned_jobs(root).items() if stage not in ("all", "total")}
    with mlflow_server(tmp / "mlflow") as url:
        run(["snakemake", "--cores", "2"], root, env={"MLFLOW_TRACKING_URI": url})
        by_key = check_summary(root)
        check_mlflow_server(url, root, jobs, by_key)
    return {"root": root, "tmp": tmp, "by_key": by_key}


def dvc_status(root: Path) -> dict:
    """`dvc status` of every stage Snakemake runs here (without LaTeX, all but the paper)."""
    targets = [] if LATEX else ["--with-deps", "figures", "tables"]
    return json.loads(run(["dvc", "status", "--json", *targets], root).stdout)


# A changed evaluation reruns the benchmark (it reads the gates and SIBS masks), the cost (it reads the logs of
# every job before it) and the reporting after them.
REPORTING = {"benchmark": "1", "cost": "1", "figures": "1", "tables": "1", **({"paper": "1"} if LATEX else {})}


@pytest.mark.slow
def test_snakemake_runs_the_study_and_reruns_only_what_changed(study):
    root, by_key = study["root"], study["by_key"]
    assert not (root / "mlflow.db").exists()  # every run went to the server
    check_counts_independently(root, by_key)
    check_paper_outputs(root, by_key)
    check_cost(root)
    for log in ("data", "model", "evaluate-dense", "profile", "masking-topk-0.25", "sibs-0.2", "mgs_cache",
                "mgs_local", "mgs_train", "mgs_calibrate-group_activity-0.5", "mgs_calibrate-distillation-0.5",
                "mgs_evaluate-distillation-0.5", "mgs_single-0.5", "summary", "benchmark"):
        assert (root / f"results/synthetic/logs/{log}.log").stat().st_size > 0
    # The jobs after the model were started by the run's job server (job_server.py), which has left with the run.
    for log in ("evaluate-dense", "masking-topk-0.25", "mgs_train", "summary"):
        assert "started by the job server" in (root / f"results/synthetic/logs/{log}.log").read_text(), log
    socket = re.search(r"serving (\S+) for Snakemake process", (root / ".snakemake/log/job_server.log").read_text())[1]
    assert not Path(socket).exists()
    # The gate-training chain (the study's longest path after the model) starts before the sweeps beside it.
    first_run = sorted((root / ".snakemake/log").glob("*.snakemake.log"))[0].read_text()
    started = [line.split(": ")[1] for line in first_run.splitlines() if re.match(r"Job \d+: \w+:", line)]
    after_model = started[started.index("model") + 1:]
    assert after_model.index("mgs_cache") < after_model.index("masking"), after_model
    # The Snakemake report: one self-contained page with the figures (and their captions) and tables.
    run(["snakemake", "--report", "report.html"], root)
    report = (root / "report.html").read_text()
    assert "f2_topk_vs_random" in report and "Top-k against random keep (synthetic study" in report
    assert "t4_matched" in report

    again = run(["snakemake", "-n", "--cores", "2"], root)
    assert "Nothing to be done" in again.stdout + again.stderr
    # Snakemake's onsuccess recorded its outputs in dvc.lock: DVC agrees that nothing is left to run.
    assert dvc_status(root) == {}

    # A longer sweep runs only its new points (and the summary that gathers them; the benchmark times every
    # SIBS threshold).
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["masking"]["keep_ratios"].append(0.5)
    params["sibs"]["thresholds"].append(0.3)
    write_params(root, params)
    assert planned_jobs(root) == {"masking": "2", "sibs": "1", "summary": "1", **REPORTING, "all": "1",
                                  "total": str(5 + len(REPORTING))}
    # A setting every evaluation reads reruns all of them, and nothing upstream.
    params["studies"]["synthetic"]["evaluate"]["batch_size"] = 2
    write_params(root, params)
    assert planned_jobs(root) == {"evaluate": "1", "profile": "1", "masking": "6", "sibs": "3", "mgs_evaluate": "2",
                                  "mgs_single": "1", "mgs_paper_setting": "1", "summary": "1", **REPORTING, "all": "1",
                                  "total": str(17 + len(REPORTING))}
    # A new MGS target calibrates and evaluates only that target, per objective; the trained gates are reused.
    params["mgs"]["targets"].append(0.75)
    write_params(root, params)
    assert planned_jobs(root) == {"evaluate": "1", "profile": "1", "masking": "6", "sibs": "3", "mgs_calibrate": "2",
                                  "mgs_evaluate": "4", "mgs_single": "1", "mgs_paper_setting": "1", "summary": "1",
                                  **REPORTING, "all": "1", "total": str(21 + len(REPORTING))}
    run(["git", "checkout", "params.yaml"], root)


def changed_stages(root: Path) -> set[str]:
    return {name.partition("@")[0] for name in dvc_status(root)}


def planned_stages(root: Path) -> set[str]:
    return set(planned_jobs(root)) - {"all", "total"}


@pytest.mark.slow
def test_an_edit_reruns_exactly_the_stages_that_import_the_module(study):
    root = study["root"]
    assert changed_stages(root) == set() and planned_stages(root) == set()
    # detect(): the evaluating stages import it only through evaluation/evaluate.py (SIBS also directly).
    source = root / "src/detr_sparsity/evaluation/detections.py"
    original = source.read_text()
    try:
        source.write_text(original + "\n# an edit\n")
        importing = {"evaluate", "profile", "masking", "sibs", "mgs_evaluate", "mgs_single", "mgs_paper_setting",
                     "benchmark"}
        assert changed_stages(root) == importing  # DVC names the stages whose own deps changed
        # Snakemake plans them and what reads their outputs; not the gate training, nor anything before it.
        assert planned_stages(root) == importing | {"summary", "cost", "figures", "tables",
                                                    *(["paper"] if LATEX else [])}
    finally:
        source.write_text(original)
    # A module no stage imports changes nothing.
    unused = root / "src/detr_sparsity/sharing.py"
    original = unused.read_text()
    try:
        unused.write_text(original + "\n# an edit\n")
        assert changed_stages(root) == set() and planned_stages(root) == set()
    finally:
        unused.write_text(original)


@pytest.mark.slow
def test_dvc_sees_the_snakemake_run_and_reruns_exactly_a_changed_param(study):
    root, by_key = study["root"], study["by_key"]
    assert dvc_status(root) == {}
    # `dvc metrics show` reads the compact metrics.json: headline numbers per configuration.
    metrics = run(["dvc", "metrics", "show", "--json"], root).stdout
    shown = next(iter(json.loads(metrics).values()))["data"]["results/synthetic/metrics.json"]["data"]
    assert shown["dense"]["AP50"] == by_key[("dense", None, None)]["AP50"]
    assert shown["topk"]["keep=0.25"]["AP"] == by_key[("topk", 0.25, "all")]["AP"]
    assert shown["mgs"]["distillation"]["target=0.5"]["AP"] == by_key[("mgs", 0.5, "distillation")]["AP"]
    # `dvc plots show`: the sparsity-AP and FLOPs-AP curves, one series per method.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)["data"]
    series = plots["AP against induced sparsity"][0]["content"]["data"]["values"]
    # every series of PLOTS is written; those the tiny study has no rows of (threshold, task) hold no values
    assert {v["filename"] for v in series} == {"topk.csv", "random.csv", "sibs.csv", "mgs-group_activity.csv",
                                                "mgs-distillation.csv"}

    check_a_clone_pulls_the_study(root, study["tmp"])

    # A new SIBS threshold: DVC reports that point and the stages that read the sweep as changed, and `dvc repro`
    # runs exactly those and what reads their outputs, itself, against the store the study ran with (its tracking
    # server, started again on the same store): there the cost stage finds the runs of every job before it.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sibs"]["thresholds"].append(0.3)
    write_params(root, params)
    paper = {"paper"}  # without LaTeX it has no entry in dvc.lock: always reported, and refused when run
    assert set(json.loads(run(["dvc", "status", "--json"], root).stdout)) - paper == {"sibs@0.3", "summary",
                                                                                     "benchmark", "cost"}
    expected = {"sibs@0.3", "summary", "benchmark", "cost", "figures", "tables", *(paper if LATEX else [])}
    with mlflow_server(study["tmp"] / "mlflow") as url:
        experiments = [e["experiment_id"] for e in rest(url, "experiments/search", {"max_results": 1000})["experiments"]
                       if e["name"] == "detr-sparsity-synthetic"]
        before = {r["id"] for r in server_runs(url, experiments)}
        repro = run(["dvc", "repro"], root, check=False, env={"MLFLOW_TRACKING_URI": url})
        new = [r for r in server_runs(url, experiments) if r["id"] not in before]
    ran = set(re.findall(r"Running stage '([^']+)'", repro.stdout))
    assert ran == expected | paper, repro.stdout + repro.stderr
    if LATEX:
        assert repro.returncode == 0, repro.stderr
    else:  # every other stage ran; the paper stops with the LaTeX message, after all of them
        assert repro.returncode != 0 and "no LaTeX toolchain" in repro.stdout + repro.stderr
    assert dvc_status(root) == {}
    assert Counter(r["tags"]["stage"] for r in new) == Counter({name.partition("@")[0]: 1 for name in expected})
    # cost.json counts the new runs of the jobs that reran, and the Snakemake run's of those that did not
    named = {Path(job["log"]).name: job["run_id"] for job in
             json.loads((root / "results/synthetic/benchmark/cost.json").read_text())["jobs"]}
    rerun = {r["tags"]["stage"]: r["id"] for r in new}
    assert (named["sibs-0.3.log"], named["summary.log"]) == (rerun["sibs"], rerun["summary"])
    assert named["sibs-0.2.log"] in before and named["data.log"] in before
    assert "started by the job server" not in (root / "results/synthetic/logs/sibs-0.3.log").read_text()  # DVC's job
    rows = json.loads((root / "results/synthetic/summary.json").read_text())
    assert [r["setting"]["threshold"] for r in rows if r["method"] == "sibs"] == [*TINY_SWEEPS["sibs"]["thresholds"], 0.3]
    run(["git", "checkout", "params.yaml"], root)


def check_a_clone_pulls_the_study(root: Path, tmp_path: Path) -> None:
    """Shared artifacts: the study pushed to a local-directory DVC remote, a fresh clone, `make pull`'s command;
    then DVC and Snakemake both have nothing to do there, and a changed param still plans its stages."""
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], root)
    run(["git", "add", "dvc.lock", ".dvc/config"], root)
    run(["git", "commit", "-q", "-m", "dvc.lock of the study, and its remote"], root)
    run(["dvc", "push"], root)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    run(["python", "-m", "detr_sparsity.sharing"], clone)

    assert dvc_status(clone) == {}
    planned = run(["snakemake", "-n", "--cores", "2"], clone)
    assert "Nothing to be done" in planned.stdout + planned.stderr
    # No stage ran and no hook: no MLflow store, and nothing for git to see (dvc.lock untouched).
    assert not (clone / "mlflow.db").exists()
    assert run(["git", "status", "--porcelain"], clone).stdout == ""

    # Snakemake recorded the pulled jobs' params: a setting every evaluation reads reruns them, nothing upstream.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["studies"]["synthetic"]["evaluate"]["batch_size"] = 2
    write_params(clone, params)
    rerun = {"evaluate": "1", "profile": "1", "masking": "4", "sibs": "2", "mgs_evaluate": "2", "mgs_single": "1",
             "mgs_paper_setting": "1", "summary": "1", **REPORTING, "all": "1", "total": str(14 + len(REPORTING))}
    assert planned_jobs(clone) == rerun
    # Pulling now refuses (before touching anything), naming what DVC does not confirm.
    refused = run(["python", "-m", "detr_sparsity.sharing"], clone, check=False)
    assert refused.returncode == 1
    assert ("evaluate@dense: changed deps: params.yaml studies.synthetic.evaluate.batch_size (modified)"
            in refused.stderr)


@pytest.mark.slow
def test_a_failed_stage_leaves_its_traceback_in_its_log(study):
    """A stage that fails writes its traceback to its log file and exits non-zero (here: a row file that lost a
    field, read by the summary)."""
    root = study["root"]
    row = root / "results/synthetic/evaluate/dense/row.json"
    original = row.read_text()
    try:
        row.write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "AP50"}))
        log = root / "results/synthetic/logs/summary-failed.log"
        failed = run(["python", "-m", "detr_sparsity", "--log", str(log), "summary", "--out", "/dev/null",
                      "--metrics", "/dev/null", "--comparisons", "/dev/null"], root, check=False)
        assert failed.returncode == 1
        text = log.read_text()
        assert "Traceback (most recent call last)" in text and f"row file {row.relative_to(root)} lacks field(s) AP50" in text
    finally:
        row.write_text(original)


@pytest.mark.slow
def test_switching_study_leaves_the_other_studys_figures_alone(study):
    """Figures, tables and the paper build of a study live under paper/<study>/: another study's reporting writes
    its own (here `other`, a copy of the tiny study's results, reported by `dvc repro` of those stages alone)."""
    root = study["root"]
    figures = root / "paper/synthetic/figures"
    before = {f.name: f.read_bytes() for f in figures.iterdir()}
    lock = (root / "dvc.lock").read_text()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["other"] = params["studies"]["synthetic"]
    params["study"] = "other"
    write_params(root, params)
    shutil.copytree(root / "results/synthetic", root / "results/other")
    try:
        run(["dvc", "repro", "--single-item", "figures", "tables"], root)
        assert (root / "paper/other/figures/f1_natural_sparsity.png").is_file()
        assert (root / "paper/other/tables/t1_dense.tex").is_file()
        assert "other study" in (root / "paper/other/figures/captions.tex").read_text()
        assert {f.name: f.read_bytes() for f in figures.iterdir()} == before
    finally:
        shutil.rmtree(root / "results/other")
        (root / "dvc.lock").write_text(lock)
        run(["git", "checkout", "params.yaml"], root)


# One evaluation per evaluating rule, the random masking included (its draws must not depend on where a shard
# starts): (row file, detections file or directory) under results/synthetic.
SHARDED = {
    "evaluate": ("evaluate/dense/row.json", "evaluate/dense/detections.json"),
    "masking": ("masking/random-0.25/rows.json", "masking/random-0.25/detections"),
    "sibs": ("sibs/0.2/row.json", "sibs/0.2/detections.json"),
    "mgs_evaluate": ("mgs/distillation/0.5/row.json", "mgs/distillation/0.5/detections.json"),
}


@pytest.mark.slow
def test_sharded_evaluations_equal_the_whole_ones(study, shards: int = 3):
    """The finished study's evaluations again with `shards` detection jobs each plus a gather: detections and rows
    equal the unsharded ones exactly. The tiny split is 2 batches of 3 images, so one shard is empty. (Last: it
    leaves Snakemake with evaluations to rerun at N = 1.)"""
    root = study["root"]
    results = root / "results/synthetic"
    status = dvc_status(root)
    unsharded = {stage: (json.loads((results / row).read_text()), detection_files(results / detections))
                 for stage, (row, detections) in SHARDED.items()}
    run(["git", "checkout", "params.yaml"], root)  # the settings of the finished run
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["evaluate"]["shards"] = shards
    write_params(root, params)
    # Sharding is no stage's param: DVC (which evaluates whole) sees the same pipeline as before.
    assert dvc_status(root) == status
    targets = [f"results/synthetic/{row}" for row, _ in SHARDED.values()]
    # Only the evaluations rerun (their jobs have other inputs now), nothing upstream.
    assert planned_jobs(root, targets) == {**{f"{stage}_shard": str(shards) for stage in SHARDED},
                                           **dict.fromkeys(SHARDED, "1"), "total": str(len(SHARDED) * (shards + 1))}
    # Each job in its own process this time (the whole evaluations were started by the first run's job server).
    run(["snakemake", "--cores", "2", *targets], root, env={"DETR_SPARSITY_JOB_SERVER": "off"})
    shard_logs = list(results.glob("logs/*-shard-*.log"))
    assert shard_logs and not any("started by the job server" in log.read_text() for log in shard_logs)
    assert not list(results.glob("**/shards/*")), "the shards' partial evaluations are temporary"
    for stage, (row_file, detections) in SHARDED.items():
        row, files = unsharded[stage]
        assert detection_files(results / detections) == files, stage
        assert comparable(json.loads((results / row_file).read_text())) == comparable(row), stage
    sibs = json.loads((results / SHARDED["sibs"][0]).read_text())
    assert sibs["images"] == 6 and sibs["shrunk_ffn"]["detections"] == 6 * 8  # every query, over all shards


def detection_files(path: Path) -> dict[str, bytes]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return {f.name: f.read_bytes() for f in files}


def comparable(row):
    """A row without what names the job rather than the result, at any depth: its MLflow runs (its own, and the gate
    training's that a gate row's training record names, `trained_by`), its detections file and the seconds it took (a
    gate row's training record carries its training and calibration times)."""
    if isinstance(row, dict):
        return {k: comparable(v) for k, v in row.items()
                if k not in ("mlflow_run_id", "trained_by", "detections") and not k.endswith("seconds")}
    if isinstance(row, list):
        return [comparable(v) for v in row]
    return row


def planned_jobs(root: Path, targets: list[str] = ()) -> dict[str, str]:
    planned = run(["snakemake", "-n", "--cores", "2", *targets], root).stdout
    if "Job stats:" not in planned:
        return {}
    return dict(re.findall(r"^(\w+)\s+(\d+)$", planned.split("Job stats:")[1].split("\n\n")[0], re.M))
