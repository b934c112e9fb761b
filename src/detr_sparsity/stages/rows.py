"""The end of every evaluating stage: its row written, its metrics and the row file logged to its MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.evaluation.evaluate import row_metrics
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def per_block_metrics(row: dict) -> dict[str, float]:
    """The row's induced sparsity of each block, as MLflow metrics."""
    return {f"induced_sparsity.{name}": value for name, value in row["induced_sparsity"]["per_block"].items()}


def record_rows(tracked: StageRun, path: Path, rows: dict, metrics: dict[str, float]) -> None:
    """Write `rows` (one row, or rows keyed by scope) to `path`; log `metrics` and the file."""
    write_json(path, rows)
    tracked.log_metrics(metrics)
    tracked.log_artifact(path)


def record_row(tracked: StageRun, path: Path, row: dict, extra_metrics: dict[str, float] | None = None) -> dict:
    """Write one evaluation's row; its metrics (AP, sparsity, FLOPs, and `extra_metrics`) go to its run."""
    record_rows(tracked, path, row, {**row_metrics(row), **(extra_metrics or {})})
    setting = " ".join(f"{k}={v}" for k, v in (row["setting"] or {}).items() if not isinstance(v, (list, dict)))
    log.info("%s %s: AP %.4f AP50 %.4f, natural sparsity %.3f, induced sparsity %.3f", row["method"], setting,
             row["AP"], row["AP50"], row["natural_sparsity"]["overall"], row["induced_sparsity"]["overall"])
    return row
