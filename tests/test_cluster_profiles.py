"""The cluster profiles: a SLURM dry run plans every stage with the resources params.yaml gives it, without SLURM."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from detr_sparsity.config import load_config
from detr_sparsity.pipeline import PIPELINE
from tiny_project import REPO, make_tiny_project, run, write_params

# The real `snakemake` command line, with a logging handler that keeps each planned job's rule, resources and threads
# (a rule's `message:` hides them from the printed dry run).
DRIVER = """
import json, logging, sys
from snakemake.cli import main
jobs = []
class Keep(logging.Handler):
    def emit(self, record):
        if str(getattr(record, "event", "")) == "job_info":
            jobs.append({"rule": record.rule_name, "threads": record.threads,
                         "resources": {k: v for k, v in dict(record.resources).items() if not k.startswith("_")}})
logging.getLogger().addHandler(Keep())
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(jobs, out)
"""

STAGES = set(PIPELINE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # No SLURM here (no sbatch, sinfo, sacct): the plugin's dry run needs none.
    return make_tiny_project(tmp_path_factory.mktemp("cluster") / "project")


def planned_jobs(root: Path, *args: str) -> list[dict]:
    record = root / "planned.json"
    proc = run([sys.executable, "-c", DRIVER, str(record), "-n", "--forceall", *args], root)
    jobs = json.loads(record.read_text())
    assert jobs, proc.stdout + proc.stderr
    return [job for job in jobs if job["rule"] != "all"]


def test_slurm_profile_plans_every_stage_with_its_resources(tiny):
    jobs = planned_jobs(tiny, "--profile", "workflow/profiles/slurm")
    cfg = load_config(tiny / "params.yaml")
    counts = Counter(job["rule"] for job in jobs)
    # the paper stage is left out without LaTeX; every other stage is planned, sweeps once per point
    assert set(counts) | {"paper"} == STAGES
    assert counts["masking"] == len(cfg.masking["methods"]) * len(cfg.masking["keep_ratios"])
    assert counts["sibs"] == len(cfg.sibs["thresholds"])
    assert counts["mgs_calibrate"] == counts["mgs_evaluate"] == len(cfg.mgs["objectives"]) * len(cfg.mgs["targets"])
    assert counts["mgs_train"] == 1  # every end-to-end objective, trained once
    for job in jobs:
        wanted = cfg.job_resources(job["rule"])
        got = job["resources"]
        assert got["mem_mb"] == wanted["mem_mb"] and got["runtime"] == wanted["runtime"], job
        assert got.get("gpu") == wanted.get("gpu"), job
        if got.get("gpu"):  # a GPU is asked for only by a stage that runs the detector on the job's device
            assert PIPELINE[job["rule"]].device, job
        if not PIPELINE[job["rule"]].exclusive:  # a timing job (the benchmark) claims every slot of the machine
            assert got["cpu_slots"] == job["threads"], job
    # the tiny study copies the default study's resources: its model-running stages ask for a GPU
    assert {j["rule"] for j in jobs if j["resources"].get("gpu")} == {s for s in STAGES if PIPELINE[s].device}


def test_study_resources_reach_the_jobs(tiny, tmp_path):
    """A study's own resources block (here: bigger, the model stage on a GPU too) is what the jobs ask for."""
    root = tmp_path / "project"
    shutil.copytree(tiny, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["resources"] = {"default": {"mem_mb": 1234, "runtime": 7},
                                                   "mgs_train": {"mem_mb": 64000, "runtime": 480, "gpu": 2}}
    write_params(root, params)
    jobs = planned_jobs(root, "--profile", "workflow/profiles/slurm")
    for job in jobs:
        expected = {"mem_mb": 64000, "runtime": 480, "gpu": 2} if job["rule"] == "mgs_train" else {
            "mem_mb": 1234, "runtime": 7}
        assert {k: job["resources"].get(k) for k in expected} == expected, job
        if job["rule"] != "mgs_train":
            assert not job["resources"].get("gpu"), job


def test_default_profile_plans_the_same_jobs_locally(tiny):
    local = planned_jobs(tiny, "--profile", "workflow/profiles/default")
    slurm = planned_jobs(tiny, "--profile", "workflow/profiles/slurm")
    assert Counter(j["rule"] for j in local) == Counter(j["rule"] for j in slurm)
    # locally the same requests are recorded; nothing enforces gpu or mem_mb without --resources limits
    assert {j["rule"] for j in local if j["resources"].get("gpu")} == {j["rule"] for j in slurm if j["resources"].get("gpu")}


def test_profiles_are_valid_yaml_with_placeholders_only():
    slurm = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert "default-resources" not in slurm  # account and partition are site settings: commented placeholders
    text = (REPO / "workflow/profiles/slurm/config.yaml").read_text()
    assert re.search(r"^#\s+- slurm_account=<account>$", text, re.M)
    assert re.search(r"^#\s+- slurm_partition=<partition>$", text, re.M)
    assert yaml.safe_load((REPO / "workflow/profiles/default/config.yaml").read_text())["cores"] == "all"


def test_slurm_threads_are_set_per_rule(tiny):
    """set-threads (the profile's commented example) reaches the job: cpus-per-task, and the job's cpu_slots."""
    jobs = planned_jobs(tiny, "--profile", "workflow/profiles/slurm", "--set-threads", "model=8")
    model = next(job for job in jobs if job["rule"] == "model")
    assert model["threads"] == 8 and model["resources"]["cpu_slots"] == 8


def test_sharded_evaluations_plan_one_job_per_shard_with_the_stage_resources(tiny, tmp_path):
    """evaluate.shards = 3: every evaluation is 3 detection jobs (each with its stage's GPU) plus its gather."""
    root = tmp_path / "project"
    shutil.copytree(tiny, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["studies"]["synthetic"]["evaluate"]["shards"] = 3
    write_params(root, params)
    jobs = planned_jobs(root, "--profile", "workflow/profiles/slurm")
    counts = Counter(job["rule"] for job in jobs)
    for stage in ("evaluate", "masking", "sibs", "mgs_evaluate"):
        assert counts[f"{stage}_shard"] == 3 * counts[stage] > 0, counts
    cfg = load_config(root / "params.yaml")
    for job in jobs:
        stage = job["rule"].removesuffix("_shard")
        assert {k: job["resources"].get(k) for k in ("mem_mb", "runtime")} == {
            k: cfg.job_resources(stage)[k] for k in ("mem_mb", "runtime")}, job
        assert job["resources"].get("gpu") == cfg.job_resources(stage).get("gpu"), job
