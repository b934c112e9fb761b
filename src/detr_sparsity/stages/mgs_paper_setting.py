"""Stage `mgs_paper_setting`: one row in the paper's own MGS setting, as a third-party reading of it describes
(STUDY.md): group_activity gates on every gated block at once, about one gate per 8 neurons, the sigmoid
threshold as is (0.5) and no calibration to a target, so the sparsity is whatever the gates give. Trained
layer-locally from the cached block inputs, as stage `mgs_local` trains the study's own group size."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.mgs.block_inputs import BlockInputs
from detr_sparsity.mgs.gates import gated_block_names, make_gates, save_gates
from detr_sparsity.mgs.group_activity import LocalTraining, train_group_activity
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.stages.rows import per_block_metrics, record_row
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, data: Path, block_inputs: Path, gates: Path,
              training: Path, detections: Path, row: Path) -> None:
    setting = cfg.mgs["paper_setting"]
    device = job_device()
    split = evaluation_split(cfg, data)
    detr = load_detr(model, device=device)
    blocks = ffn_blocks(detr)
    # The group size is checked against the FFN width here, before the cache is read.
    trained = make_gates(blocks, gated_block_names(cfg.mgs["blocks"], blocks), setting["group_size"],
                         setting["gate_threshold"])
    trained = {name: gate.to(device) for name, gate in trained.items()}
    cached = BlockInputs.load(block_inputs)
    record = train_group_activity(trained, {n: blocks[n].fc1 for n in trained},
                                  {n: cached.inputs[n].to(device) for n in trained},
                                  {n: cached.images[n] for n in trained}, LocalTraining(**cfg.gate_training["local"]),
                                  cfg.seed)
    measured = evaluate_policies(detr, split, trained, detections)
    record = {"objective": LAYER_LOCAL, **setting, "blocks": sorted(trained), "settings": cfg.gate_training["local"],
              **record, "mlflow_run_id": tracked.run_id}
    save_gates(gates, trained, {"objective": LAYER_LOCAL, "model": str(model), "mlflow_run_id": tracked.run_id,
                                "train_seconds": record["train_seconds"], "calibration": None})
    write_json(training, record)
    found = {"method": "mgs",
             "setting": {"objective": LAYER_LOCAL, "protocol": "paper", "scope": "all", "target": None,
                         "group_size": setting["group_size"], "gate_threshold": setting["gate_threshold"],
                         "calibration": None, "blocks": sorted(trained)},
             **measured, "gates": str(gates),
             "training": {"steps": 0, "train_seconds": 0.0, "local_train_seconds": record["train_seconds"],
                          "calibration_seconds": 0.0, "calibration": None, "mlflow_run_id": tracked.run_id},
             "mlflow_run_id": tracked.run_id}
    record_row(tracked, row, found, per_block_metrics(found))
