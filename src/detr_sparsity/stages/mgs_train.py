"""Stage `mgs_train`: one objective's MGS gate set at one sparsity target, calibrated to it on the calibration split.

For `group_activity` (the paper's objective) nothing is trained here: its gates were trained once, layer-locally,
by stage `mgs_local`, and this job only calibrates them to its target. An end-to-end objective (task,
distillation, oracle) trains its gates toward the target on the frozen model from the cached front end, starting
from the layer-local gates where `warm_start` asks for it, then calibrates them the same way. Calibration is one
global logit offset, or (`mgs.calibration: per_block`) per-block offsets allocated greedily on a dense proxy and
levelled by the global one (`mgs.allocation`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.mgs.allocation import calibrate
from detr_sparsity.mgs.calibration import calibration_front_end
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import gate_metadata, gated_block_names, load_gates, make_gates, save_gates
from detr_sparsity.mgs.objectives import LAYER_LOCAL
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr, weights_digest
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, objective: str, target: float, model: Path, data: Path,
              cache: Path, local: Path, gates: Path, training: Path) -> None:
    mgs = cfg.mgs
    budget = cfg.gate_training["training"]
    detr = load_detr(model, device=job_device())
    blocks = ffn_blocks(detr)
    # Every setting is checked (block names, group size against the FFN width) before anything is read.
    names = gated_block_names(mgs["blocks"], blocks)
    fresh = make_gates(blocks, names, mgs["group_size"], mgs["gate_threshold"])
    settings = None if objective == LAYER_LOCAL else GateTraining(
        target=target, objective=objective, **{k: v for k, v in budget.items() if k != "warm_start"})
    calibration_split = load_split(data, cfg.profile["split"])
    before = weights_digest(detr)
    from_local = objective == LAYER_LOCAL or budget["warm_start"]
    if from_local:
        trained = load_gates(local)
        if sorted(trained) != sorted(fresh):
            raise ValueError(f"{local} gates blocks {', '.join(sorted(trained))}, mgs.blocks asks for "
                             f"{', '.join(sorted(fresh))}; rerun stage mgs_local")
    else:
        trained = fresh
    trained = {name: gate.to(detr.device) for name, gate in trained.items()}

    final, curve = None, []
    if settings is not None:
        front_end = FrontEndCache.load(cache)
        # Outside the outputs, so an interrupted job resumes (Snakemake removes a failed job's outputs); named
        # after the settings and the dense weights, so a checkpoint is never resumed on another model.
        checkpoint = (cfg.results_dir / "checkpoints"
                      / f"mgs-{objective}-{target}-{tracked.params_hash}-{before[:12]}.pt")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        log.info("training %d gates (G = %d, %s objective%s) toward %.0f %% induced sparsity on %d cached images",
                 len(trained), mgs["group_size"], objective, ", from the group_activity gates" if budget["warm_start"]
                 else "", 100 * target, len(front_end))
        final = train_gates(detr, trained, front_end, settings, cfg.seed, checkpoint,
                            log_step=lambda step, metrics: tracked.log_metrics(metrics, step=step))
        curve = final.pop("curve")
        checkpoint.unlink(missing_ok=True)
        if weights_digest(detr) != before:
            raise RuntimeError("gate training changed the dense model's weights; only the gates may train")
        tracked.log_metrics({"train_seconds": final["train_seconds"],
                             "final_induced_sparsity": final["induced_sparsity"]})

    held_out = calibration_front_end(detr, calibration_split, image_processor(cfg.input), budget["batch_size"])
    calibration = calibrate(mgs["calibration"], detr, trained, held_out, list(range(len(held_out))), target,
                            budget["batch_size"])
    calibration["split"] = calibration_split.name
    tracked.log_metrics({f"calibration_{k}": v for k, v in calibration.items() if isinstance(v, (int, float))})
    record = {"target": target, "objective": objective, "group_size": mgs["group_size"],
              "gate_threshold": mgs["gate_threshold"], "blocks": sorted(trained),
              "settings": budget if settings is not None else None,
              "final": final, "calibration": calibration, "curve": curve,
              # The layer-local training this gate set starts from (group_activity, or a warm start).
              "local": gate_metadata(local)["info"] if from_local else None,
              "dense_weights_sha256": before, "mlflow_run_id": tracked.run_id}
    save_gates(gates, trained, {"target": target, "objective": objective, "model": str(model),
                                "mlflow_run_id": tracked.run_id})
    write_json(training, record)
    tracked.log_artifact(training)
    log.info("%s gates for target %.2f: calibrated sparsity %.3f on the %s split%s", objective, target,
             calibration["sparsity_after"], calibration_split.name,
             "" if final is None else f", after {final['steps']} training steps ({final['train_seconds']:.0f} s)")
