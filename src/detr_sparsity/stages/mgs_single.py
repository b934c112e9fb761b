"""Stage `mgs_single` (the paper's headline protocol): each block's group_activity gate alone, the other blocks
dense, calibrated to one target and evaluated.

One job per target evaluates every gated block. A block gated alone sees its dense input, so its calibration is
its own: one logit offset bisected so that the block's induced sparsity on the calibration split is the target,
on the block's dense input recorded once (`calibrate_gate_alone`).
Rows are keyed by scope (the block), as the masking stage's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split, row_metrics
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.mgs.calibration import calibrate_gate_alone, calibration_front_end
from detr_sparsity.mgs.gates import gate_metadata, load_gates
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.models.load import load_detr
from detr_sparsity.stages.rows import record_rows
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, target: float, model: Path, data: Path, local: Path,
              detections: Path, rows: Path | None, sharding: Sharding = WHOLE_SPLIT) -> None:
    """Rows for every gated block alone at one target, keyed by block. A shard job writes one partial evaluation
    per block into `detections` and no rows."""
    device = job_device()
    split = evaluation_split(cfg, data, sharding=sharding)
    detr = load_detr(model, device=device)
    metadata = gate_metadata(local)
    names = list(load_gates(local))
    calibration_split = load_split(data, cfg.profile["split"])
    held_out = None
    found, metrics = {}, {}
    for name in names:
        # A fresh copy of the gate for each block: calibration folds its offset into the gate's bias.
        gate = load_gates(local)[name].to(device)
        if held_out is None:
            held_out = calibration_front_end(detr, calibration_split, image_processor(cfg.input),
                                             cfg.evaluate["batch_size"])
        calibration = calibrate_gate_alone(detr, name, gate, held_out, list(range(len(held_out))), target,
                                           cfg.evaluate["batch_size"])
        measured = evaluate_policies(detr, split, {name: gate}, detections / f"{name}.json")
        if measured is None:  # a shard job: the block's partial evaluation is written
            continue
        row = {"method": "mgs",
               "setting": {"objective": LAYER_LOCAL, "target": target, "protocol": "single", "scope": name,
                           "group_size": metadata["group_size"], "gate_threshold": metadata["threshold"],
                           "blocks": [name]},
               **measured, "gates": str(local),
               "training": {"train_seconds": metadata["info"]["train_seconds"],
                            "calibration": {**calibration, "split": calibration_split.name},
                            "mlflow_run_id": metadata["info"]["mlflow_run_id"]},
               "mlflow_run_id": tracked.run_id}
        found[name] = row
        metrics.update({f"{key}.{name}": value for key, value in row_metrics(row).items()})
        log.info("group_activity gate of %s alone at target %.2f: AP %.4f AP50 %.4f, its induced sparsity %.3f",
                 name, target, row["AP"], row["AP50"], row["induced_sparsity"]["per_block"][name])
    if not sharding.detects_shard:
        record_rows(tracked, rows, found, metrics)
