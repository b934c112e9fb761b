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
    setting = {**{k: record[k] for k in ("target", "objective", "group_size", "gate_threshold", "blocks")},
               "protocol": "all", "scope": "all"}
    found = {"method": "mgs", "setting": setting, **measured, "gates": str(gates),
             "training": training_cost(record), "mlflow_run_id": tracked.run_id}
    record_row(tracked, row, found, per_block_metrics(found))


def training_cost(record: dict) -> dict:
    """What a gate set cost and where it came from: its end-to-end training (steps, seconds, the last batch's
    sparsity, the target it was trained toward, its MLflow run), the layer-local training it is or started from
    (group_activity, or a warm start), both shared by every target, and its own calibration."""
    final, local = record["final"], record["local"]
    return {"steps": final["steps"] if final else 0,
            "train_seconds": final["train_seconds"] if final else 0.0,
            "induced_sparsity": final["induced_sparsity"] if final else None,
            "trained_toward": record["trained_target"], "trained_by": record["trained_by"],
            "local_train_seconds": local["train_seconds"] if local else 0.0,
            "calibration_seconds": record["calibration"]["seconds"],
            "calibration": record["calibration"], "mlflow_run_id": record["mlflow_run_id"]}
