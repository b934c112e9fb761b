"""Stage `summary`: every configured evaluation's rows gathered into summary.json (the study's record), each
configuration's headline numbers into metrics.json (DVC's metrics), and the headline comparisons with their
bootstrap intervals over the evaluation images into comparisons.json."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.machine import job_cores
from detr_sparsity.pipeline import gathered
from detr_sparsity.reporting.comparisons import comparisons as headline_comparisons
from detr_sparsity.reporting.summary import headline_metrics, read_rows
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, out: Path, metrics: Path, comparisons: Path) -> None:
    rows = read_rows(gathered(cfg, "summary", "rows"))
    bootstrap = cfg.raw["bootstrap"]
    processes = job_cores()
    compared = headline_comparisons(rows, bootstrap["resamples"], cfg.seed, bootstrap["level"], processes)
    write_json(out, rows)
    write_json(metrics, headline_metrics(rows))
    write_json(comparisons, compared)
    tracked.log_metrics({"rows": len(rows), "comparisons": len(compared["comparisons"]),
                         "bootstrap_processes": processes})
    for path in (out, metrics, comparisons):
        tracked.log_artifact(path)
    log.info("gathered %d row(s) into %s", len(rows), out)
