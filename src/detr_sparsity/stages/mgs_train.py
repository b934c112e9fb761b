"""Stage `mgs_train`: the gates of every end-to-end objective of `mgs.objectives` (task, distillation, oracle),
each trained once per study on the frozen DETR from the cached front end, toward `mgs.train_target`, starting from
the layer-local group_activity gates (stage `mgs_local`) where `warm_start` asks for it. Stage `mgs_calibrate`
calibrates them to every target, as it does the group_activity gates.

The objectives train one after another in this one job. Its output directory holds, per objective,
`<objective>.safetensors` (the gates as trained, uncalibrated) and `<objective>.json` (the settings, the last
step's metrics, the training time and the training curve).
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import atomic_dir, write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import gate_metadata, gated_block_names, load_gate_set, make_gates, save_gates
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr, weights_digest
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, cache: Path, local: Path, out: Path) -> None:
    mgs = cfg.mgs
    budget = cfg.gate_training["training"]
    target = mgs["train_target"]
    detr = load_detr(model, device=job_device())
    blocks = ffn_blocks(detr)
    # Every setting is checked (block names, group size against the FFN width, each objective's training) before
    # anything is read.
    names = gated_block_names(mgs["blocks"], blocks)

    def start_gates():
        fresh = make_gates(blocks, names, mgs["group_size"], mgs["gate_threshold"])
        return load_gate_set(local, list(fresh), "mgs_local") if budget["warm_start"] else fresh

    settings = {objective: GateTraining.from_budget(budget, target, objective)
                for objective in mgs["objectives"] if objective != LAYER_LOCAL}
    if settings:
        start_gates()  # the start's blocks checked before the cache is read
    before = weights_digest(detr)
    front_end = FrontEndCache.load(cache) if settings else None
    checkpoints = []
    with atomic_dir(out) as tmp:
        for objective, training in settings.items():
            gates = {name: gate.to(detr.device) for name, gate in start_gates().items()}
            # Outside the outputs, so an interrupted job resumes; named after the settings and the dense weights, so
            # a checkpoint is never resumed on another model. Removed once every objective's gates are written.
            checkpoint = (cfg.results_dir / "checkpoints"
                          / f"mgs-{objective}-{target}-{tracked.params_hash}-{before[:12]}.pt")
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.append(checkpoint)
            log.info("training %d gates (G = %d, %s objective%s) toward %.0f %% induced sparsity on %d cached images",
                     len(gates), mgs["group_size"], objective, ", from the group_activity gates"
                     if budget["warm_start"] else "", 100 * target, len(front_end))
            final = train_gates(detr, gates, front_end, training, cfg.seed, checkpoint,
                                log_step=lambda step, metrics, o=objective:
                                    tracked.log_metrics({f"{o}.{k}": v for k, v in metrics.items()}, step=step))
            curve = final.pop("curve")
            if weights_digest(detr) != before:
                raise RuntimeError("gate training changed the dense model's weights; only the gates may train")
            tracked.log_metrics({f"{objective}.train_seconds": final["train_seconds"],
                                 f"{objective}.final_induced_sparsity": final["induced_sparsity"]})
            record = {"objective": objective, "target": target, "group_size": mgs["group_size"],
                      "gate_threshold": mgs["gate_threshold"], "blocks": sorted(gates), "settings": budget,
                      "final": final, "curve": curve,
                      # The layer-local training these gates start from (a warm start), or None.
                      "local": gate_metadata(local)["info"] if budget["warm_start"] else None,
                      "dense_weights_sha256": before, "mlflow_run_id": tracked.run_id}
            save_gates(tmp / f"{objective}.safetensors", gates,
                       {"target": target, "objective": objective, "model": str(model), "mlflow_run_id": tracked.run_id,
                        "train_seconds": final["train_seconds"]})
            write_json(tmp / f"{objective}.json", record)
            log.info("%s gates: %d steps toward %.2f (%.0f s), last batch's sparsity %.3f", objective, final["steps"],
                     target, final["train_seconds"], final["induced_sparsity"])
    for checkpoint in checkpoints:
        checkpoint.unlink(missing_ok=True)
    tracked.log_artifact(out, "trained")
