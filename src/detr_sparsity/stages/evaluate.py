"""Stage `evaluate`: the dense model's row (detections, COCO AP, natural sparsity, FLOPs)."""

from __future__ import annotations

from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.stages.rows import record_row
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, method: str, model: Path, data: Path, detections: Path,
              row: Path | None, sharding: Sharding = WHOLE_SPLIT) -> None:
    """The row of `method` (dense: no policy installed); a shard job writes its partial evaluation only."""
    split = evaluation_split(cfg, data, sharding=sharding)
    detr = load_detr(model, device=job_device())
    measured = evaluate_policies(detr, split, {}, detections)
    if measured is not None:
        record_row(tracked, row, {"method": method, "setting": None, **measured, "mlflow_run_id": tracked.run_id})
