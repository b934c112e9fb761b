# The study's pipeline. Its stages are declared once, in src/detr_sparsity/pipeline.py: the rules below are
# derived from that declaration (workflow/rules/stages.smk), and so is dvc.yaml (`python -m detr_sparsity dvc_yaml`).
# Settings come from params.yaml only, validated by detr_sparsity.config before any job starts.
import os
import sys
import uuid
from pathlib import Path

from detr_sparsity import job_server
from detr_sparsity.cli import load_study
from detr_sparsity.pipeline import PAPER, RESULTS, path, render
from detr_sparsity.processes import this_process
from detr_sparsity.reporting.paper import toolchain_missing
from detr_sparsity.sharing import keeping_modification_times, record_in_dvc
from detr_sparsity.tracking import PIPELINE_RUN_ENV


CFG = load_study("params.yaml")
# Every job of this invocation tags its MLflow run with one id, so a pipeline's runs can be grouped.
os.environ.setdefault(PIPELINE_RUN_ENV, uuid.uuid4().hex[:12])
STUDY = CFG.name
# Without a LaTeX toolchain the PDF is left out of the default target (rule `all`), and said so at the start;
# the `paper` rule is declared all the same, so the DAG is the same on every machine.
LATEX_MISSING = toolchain_missing()


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"


# `snakemake --report report.html`: one self-contained page of the study, figures and tables with captions.
report: "workflow/report/study.rst"


rule all:
    input:
        path("summary", "out", STUDY),
        path("figures", "out", STUDY),
        path("tables", "markdown", STUDY),
        [] if LATEX_MISSING else path("paper", "pdf", STUDY),
    default_target: True


if LATEX_MISSING:
    print(f"NOTE: {LATEX_MISSING}", file=sys.stderr)


# The job server of a local run (job_server.py): its jobs start from a process that imported torch, transformers and
# MLflow once, instead of each spending seconds of a core importing them. Cluster jobs start as before, and so does
# every job where DETR_SPARSITY_JOB_SERVER=off.
JOB_SERVER = []


onstart:
    # One process creates the MLflow store and experiment before parallel jobs open it.
    shell("python -m detr_sparsity init_tracking")
    if workflow.local_exec and os.environ.get(job_server.SERVER_ENV) != job_server.OFF:
        JOB_SERVER.append(job_server.start(this_process(), Path(".snakemake/log/job_server.log")))


onsuccess:
    for server in JOB_SERVER:
        job_server.stop(server)
    # Record what Snakemake produced in dvc.lock and DVC's cache (`dvc commit --force`, without DVC's run cache:
    # sharing.record_in_dvc): DVC versions the artifacts, and a following `dvc repro` or `dvc status` sees the same
    # pipeline as up to date. Without LaTeX the paper stage did not run: record everything upstream of it.
    # A run of a few targets, before the rest of the study exists, leaves dvc.lock as it was: DVC records the
    # pipeline whole or not at all. DVC copies outputs back with new modification times: the jobs' own are kept, or
    # the next run could rerun what is up to date (sharing.keeping_modification_times).
    try:
        with keeping_modification_times([render(root, study=STUDY) for root in (RESULTS, PAPER)]):
            record_in_dvc()
    except Exception as error:
        print(f"NOTE: dvc.lock is not updated ({type(error).__name__}: {error}). A run of only some targets ends so "
              "while the rest of the study has no outputs yet; otherwise run `dvc commit --force` to see why.",
              file=sys.stderr)


onerror:
    for server in JOB_SERVER:
        job_server.stop(server)
    # A cluster job killed for its memory: Snakemake names the rule and the job's log; this names the setting.
    for hint in memory_hints(log):
        print(hint, file=sys.stderr)
