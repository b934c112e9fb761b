"""Stage `mgs_evaluate`: a trained gate set's row, measured by the same evaluation as every method."""

from __future__ import annotations

import json
from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.mgs.gates import load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.stages.rows import per_block_metrics, record_row
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, objective: str, target: float, model: Path, data: Path,
              gates: Path, training: Path, detections: Path, row: Path | None,
              sharding: Sharding = WHOLE_SPLIT) -> None:
    """The gated model's row (a shard job writes its partial evaluation only)."""
    record = json.loads(Path(training).read_text())
    if (record["objective"], record["target"]) != (objective, target):
        raise ValueError(f"{training} records {record['objective']} gates for target {record['target']}, "
                         f"not {objective} gates for {target}")
    device = job_device()
    gate_set = {name: gate.to(device) for name, gate in load_gates(gates).items()}
    split = evaluation_split(cfg, data, sharding=sharding)
    detr = load_detr(model, device=device)
    measured = evaluate_policies(detr, split, gate_set, detections)
    if measured is None:
        return
    setting = {k: record[k] for k in ("target", "objective", "group_size", "gate_threshold", "blocks")}
    found = {"method": "mgs", "setting": setting, **measured, "gates": str(gates),
             "training": {"steps": record["final"]["steps"], "train_seconds": record["final"]["train_seconds"],
                          "induced_sparsity": record["final"]["induced_sparsity"],
                          "calibration": record["calibration"], "mlflow_run_id": record["mlflow_run_id"]},
             "mlflow_run_id": tracked.run_id}
    record_row(tracked, row, found, per_block_metrics(found))
