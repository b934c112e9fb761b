"""Stage `summary`: every configured evaluation's rows gathered into summary.json (the study's record), and
each configuration's headline numbers into metrics.json (DVC's metrics)."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.pipeline import gathered
from detr_sparsity.reporting.summary import headline_metrics, read_rows
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, out: Path, metrics: Path) -> None:
    rows = read_rows(gathered(cfg, "summary", "rows"))
    write_json(out, rows)
    write_json(metrics, headline_metrics(rows))
    tracked.log_metrics({"rows": len(rows)})
    tracked.log_artifact(out)
    tracked.log_artifact(metrics)
    log.info("gathered %d row(s) into %s", len(rows), out)
