"""Stage `summary`: gather every evaluation's row file into results/<study>/summary.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.evaluation.coco_eval import AP_METRICS

log = logging.getLogger(__name__)

REQUIRED = ("method", "setting", *AP_METRICS, "natural_sparsity", "induced_sparsity", "ffn_flops",
            "total_flops", "detections", "annotations", "mlflow_run_id")


def gather(row_paths: list[Path], out_path: Path) -> list[dict]:
    """One list of rows, in the given order; a row missing a field of the record is an error."""
    rows = []
    for path in row_paths:
        row = json.loads(Path(path).read_text())
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"row file {path} lacks field(s) {', '.join(missing)}")
        rows.append(row)
    write_json(out_path, rows)
    log.info("gathered %d row(s) into %s", len(rows), out_path)
    return rows
