"""Stage `cost`: what the study's current outputs cost to compute, per stage, from the MLflow runs that their jobs'
logs name (results/<study>/benchmark/cost.json, beside the benchmark's speed.json; table T6)."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.reporting.cost import study_cost
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, summary: Path, speed: Path, out: Path) -> None:
    # summary.json and speed.json are not read: they are inputs so that the stage runs after every stage it reports on.
    cost = study_cost(cfg, "cost")
    write_json(out, cost)
    total = cost["total"]
    tracked.log_metrics({"study_jobs": total["jobs"], "study_wall_seconds": total["wall_seconds"],
                         "study_cpu_seconds": total["cpu_seconds"]})
    tracked.log_artifact(out)
    log.info("%d job(s) of %d stage(s): %.1f min wall, %.1f min CPU in all; wrote %s", total["jobs"],
             len(cost["stages"]), total["wall_seconds"] / 60, total["cpu_seconds"] / 60, out)
