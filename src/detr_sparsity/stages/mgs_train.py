"""Stage `mgs_train`: one MGS gate set for one objective and sparsity target, trained on the frozen model from
the cached front end, saved with its training record."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.mgs.calibration import calibrate_gates
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import gated_block_names, make_gates, save_gates
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr, weights_digest
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, objective: str, target: float, model: Path, cache: Path,
              gates: Path, training: Path) -> None:
    mgs = cfg.mgs
    settings = GateTraining(target=target, objective=objective, **cfg.gate_training["training"])
    detr = load_detr(model, device=job_device())
    blocks = ffn_blocks(detr)
    # Every setting is checked (block names, group size against the FFN width) before the cache is read.
    trained = make_gates(blocks, gated_block_names(mgs["blocks"], blocks), mgs["group_size"], mgs["gate_threshold"])
    trained = {name: gate.to(detr.device) for name, gate in trained.items()}
    front_end = FrontEndCache.load(cache)
    before = weights_digest(detr)
    # Outside the outputs, so an interrupted job resumes (Snakemake removes a failed job's outputs); named
    # after the settings and the dense weights, so a checkpoint is never resumed on another model.
    checkpoint = cfg.results_dir / "checkpoints" / f"mgs-{objective}-{target}-{tracked.params_hash}-{before[:12]}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    log.info("training %d gates (G = %d, %s objective) toward %.0f %% induced sparsity on %d cached images",
             len(trained), mgs["group_size"], objective, 100 * target, len(front_end))
    final = train_gates(detr, trained, front_end, settings, cfg.seed, checkpoint,
                        log_step=lambda step, metrics: tracked.log_metrics(metrics, step=step))
    curve = final.pop("curve")
    calibration = None
    if settings.calibration_images:
        held_out = list(range(len(front_end) - settings.calibration_images, len(front_end)))
        calibration = calibrate_gates(detr, trained, front_end, held_out, target, settings.batch_size)
        tracked.log_metrics({f"calibration_{k}": v for k, v in calibration.items()})
    if weights_digest(detr) != before:
        raise RuntimeError("gate training changed the dense model's weights; only the gates may train")
    record = {"target": target, "objective": objective, "group_size": mgs["group_size"],
              "gate_threshold": mgs["gate_threshold"], "blocks": sorted(trained), "images": len(front_end),
              "settings": cfg.gate_training["training"], "final": final, "calibration": calibration, "curve": curve,
              "dense_weights_sha256": before, "mlflow_run_id": tracked.run_id}
    save_gates(gates, trained, {"target": target, "objective": objective, "model": str(model),
                                "mlflow_run_id": tracked.run_id})
    write_json(training, record)
    tracked.log_artifact(training)
    checkpoint.unlink(missing_ok=True)
    tracked.log_metrics({"train_seconds": final["train_seconds"], "final_induced_sparsity": final["induced_sparsity"]})
    log.info("%s gates for target %.2f: last training batch at sparsity %.3f after %d steps (%.0f s)", objective,
             target, final["induced_sparsity"], final["steps"], final["train_seconds"])
