"""Stage `mgs_local`: the group_activity gates (the paper's objective) of every gated block, trained once per
study, layer-locally, from the cached dense inputs of the blocks: no pass through the rest of DETR. Stage
`mgs_calibrate` calibrates them to each target."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.mgs.block_inputs import BlockInputs
from detr_sparsity.mgs.gates import gated_block_names, make_gates, save_gates
from detr_sparsity.mgs.group_activity import LocalTraining, train_group_activity
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.models.load import load_detr, weights_digest
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, block_inputs: Path, gates: Path,
              training: Path) -> None:
    mgs = cfg.mgs
    settings = LocalTraining(**cfg.gate_training["local"])
    detr = load_detr(model, device=job_device())
    blocks = ffn_blocks(detr)
    # Every setting is checked (block names, group size against the FFN width) before the cache is read.
    trained = make_gates(blocks, gated_block_names(mgs["blocks"], blocks), mgs["group_size"], mgs["gate_threshold"])
    trained = {name: gate.to(detr.device) for name, gate in trained.items()}
    cached = BlockInputs.load(block_inputs)
    missing = sorted(set(trained) - set(cached.inputs))
    if missing:
        raise ValueError(f"{block_inputs} holds no inputs of block(s) {', '.join(missing)}; rerun stage mgs_cache")
    before = weights_digest(detr)
    log.info("training %d group_activity gates (G = %d) layer-locally on %s cached block inputs", len(trained),
             mgs["group_size"], ", ".join(f"{n} {len(cached.inputs[n])}" for n in trained))
    record = train_group_activity(trained, {name: blocks[name].fc1 for name in trained},
                                  {name: cached.inputs[name].to(detr.device) for name in trained},
                                  {name: cached.images[name] for name in trained}, settings, cfg.seed,
                                  log_step=lambda step, metrics: tracked.log_metrics(metrics, step=step))
    if weights_digest(detr) != before:
        raise RuntimeError("gate training changed the dense model's weights; only the gates may train")
    record = {"objective": LAYER_LOCAL, "group_size": mgs["group_size"], "gate_threshold": mgs["gate_threshold"],
              "blocks": sorted(trained), "settings": cfg.gate_training["local"], **record,
              "dense_weights_sha256": before, "mlflow_run_id": tracked.run_id}
    save_gates(gates, trained, {"objective": LAYER_LOCAL, "model": str(model), "mlflow_run_id": tracked.run_id,
                                "train_seconds": record["train_seconds"]})
    write_json(training, record)
    tracked.log_artifact(training)
    tracked.log_metrics({"train_seconds": record["train_seconds"]})
    log.info("group_activity gates trained in %.1f s", record["train_seconds"])
