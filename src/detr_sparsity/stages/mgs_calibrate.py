"""Stage `mgs_calibrate`: one objective's MGS gate set calibrated to one sparsity target on the calibration split.

Every objective's gates are trained once per study: group_activity's (the paper's objective) layer-locally by stage
`mgs_local`, an end-to-end objective's (task, distillation, oracle) toward `mgs.train_target` by stage `mgs_train`.
Nothing is trained here. Calibration is one global logit offset, or (`mgs.calibration: per_block`) per-block
offsets allocated greedily on a dense proxy and levelled by the global one (`mgs.allocation`); it is measured
through the gated model, folded into the gate biases, and recorded with what the gates were trained toward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.mgs.allocation import calibrate
from detr_sparsity.mgs.calibration import calibration_front_end
from detr_sparsity.mgs.gates import gate_metadata, gated_block_names, load_gate_set, make_gates, save_gates
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.models.load import load_detr, weights_digest
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, objective: str, target: float, model: Path, data: Path,
              local: Path, trained: Path, gates: Path, training: Path) -> None:
    mgs = cfg.mgs
    batch_size = cfg.gate_training["training"]["batch_size"]
    detr = load_detr(model, device=job_device())
    blocks = ffn_blocks(detr)
    # Every setting is checked (block names, group size against the FFN width) before anything is read.
    expected = make_gates(blocks, gated_block_names(mgs["blocks"], blocks), mgs["group_size"], mgs["gate_threshold"])
    trained_end_to_end = objective != LAYER_LOCAL
    source, producer = ((trained / f"{objective}.safetensors", "mgs_train") if trained_end_to_end
                        else (local, "mgs_local"))
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no {objective} gates (mgs.objectives = {mgs['objectives']}); "
                                f"rerun stage {producer}")
    gate_set = {name: gate.to(detr.device) for name, gate in load_gate_set(source, list(expected), producer).items()}
    # What the gates were trained toward, and how: the end-to-end training's record; group_activity's gates have no
    # target and are themselves the layer-local training the end-to-end ones start from.
    if trained_end_to_end:
        end_to_end = json.loads(source.with_suffix(".json").read_text())
        training_of_gates = {"settings": end_to_end["settings"], "trained_target": end_to_end["target"],
                             "final": end_to_end["final"], "local": end_to_end["local"],
                             "trained_by": end_to_end["mlflow_run_id"]}
    else:
        training_of_gates = {"settings": None, "trained_target": None, "final": None,
                             "local": gate_metadata(local)["info"], "trained_by": None}
    before = weights_digest(detr)
    calibration_split = load_split(data, cfg.profile["split"])
    held_out = calibration_front_end(detr, calibration_split, image_processor(cfg.input), batch_size)
    calibration = calibrate(mgs["calibration"], detr, gate_set, held_out, list(range(len(held_out))), target,
                            batch_size)
    calibration["split"] = calibration_split.name
    tracked.log_metrics({f"calibration_{k}": v for k, v in calibration.items() if isinstance(v, (int, float))})
    record = {"target": target, "objective": objective, "group_size": mgs["group_size"],
              "gate_threshold": mgs["gate_threshold"], "blocks": sorted(gate_set), **training_of_gates,
              "calibration": calibration, "dense_weights_sha256": before, "mlflow_run_id": tracked.run_id}
    save_gates(gates, gate_set, {"target": target, "objective": objective, "model": str(model),
                                 "mlflow_run_id": tracked.run_id})
    write_json(training, record)
    tracked.log_artifact(training)
    log.info("%s gates for target %.2f: calibrated sparsity %.3f on the %s split%s", objective, target,
             calibration["sparsity_after"], calibration_split.name,
             "" if not trained_end_to_end else f" (trained toward {record['trained_target']:.2f})")
