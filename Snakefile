# The study's pipeline. dvc.yaml describes the same DAG with the same commands (tests keep them in step).
# Settings come from params.yaml only, validated by detr_sparsity.config before any job starts.
import os
import sys
import uuid

from detr_sparsity.config import load_config
from detr_sparsity.tracking import PIPELINE_RUN_ENV


CFG = load_config("params.yaml")
# Every job of this invocation tags its MLflow run with one id, so a pipeline's runs can be grouped.
os.environ.setdefault(PIPELINE_RUN_ENV, uuid.uuid4().hex[:12])
STUDY = CFG.name
RESULTS = f"results/{STUDY}"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/masking.smk"
include: "workflow/rules/sibs.smk"
include: "workflow/rules/mgs.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/paper.smk"


# `snakemake --report report.html`: one self-contained page of the study, figures and tables with captions.
report: "workflow/report/study.rst"


rule all:
    input:
        f"{RESULTS}/summary.json",
        rules.figures.output.figures,
        rules.tables.output.markdown,
        [] if LATEX_MISSING else rules.paper.output,
        f"{RESULTS}/benchmark/speed.json",
    default_target: True


if LATEX_MISSING:
    print(f"NOTE: {LATEX_MISSING}", file=sys.stderr)


onstart:
    # One process creates the MLflow store and experiment before parallel jobs open it.
    shell("python -m detr_sparsity init-tracking")


onsuccess:
    # Record what Snakemake produced in dvc.lock and DVC's cache: DVC versions the artifacts, and a
    # following `dvc repro` or `dvc status` sees the same pipeline as up to date.
    # Without LaTeX the paper stage did not run: record everything upstream of it.
    # A run of a few targets, before the rest of the study exists, leaves dvc.lock as it was: DVC records the
    # pipeline whole or not at all.
    try:
        shell("dvc commit --force --quiet" + (" --with-deps figures tables" if LATEX_MISSING else ""))
    except Exception:
        print("NOTE: dvc.lock is not updated (`dvc commit` failed). A run of only some targets ends so while the "
              "rest of the study has no outputs yet; otherwise run `dvc commit` to see why.", file=sys.stderr)
