"""Stage `benchmark`: measured speed of sparse FFN execution (dense vs SIBS shrunk vs MGS sparse kernel), per FFN
block kind and end to end, at the study's shapes and DETR-R50's (params.yaml's benchmark section)."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.execution.benchmark import format_table, run_benchmark
from detr_sparsity.pipeline import gathered_points
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, data: Path, neurons: Path, out: Path) -> None:
    gate_files = {str(point["target"]): file for point, file in gathered_points(cfg, "benchmark", "gates")}
    result = run_benchmark(cfg, model, data, neurons, gate_files)
    write_json(out, result)
    log.info("benchmark rows:\n%s", format_table(result))
    tracked.log_metrics({**{f"ffn_share.{shape}": share for shape, share in result["ffn_share"].items()},
                         **{f"speedup.{r['shape']}.{r['scope']}.{r['method']}.{r['setting']}": r["speedup"]
                            for r in result["rows"]}})
    tracked.log_artifact(out)
