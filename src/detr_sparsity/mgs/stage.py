"""The MGS stages: `mgs_cache` (frozen front end of the training images, once), `mgs_train` (one gate set
per objective and sparsity target) and `mgs_evaluate` (its row of summary.json, through the common
evaluation)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split, row_metrics
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.mgs.calibration import calibrate_gates
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.mgs.gates import load_gates, make_gates, save_gates
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def mgs_cache_stage(cfg: StudyConfig, model_dir: Path, data_dir: Path, out_path: Path, run: StageRun) -> dict:
    """Stage `mgs_cache`: projected feature maps, labels and dense outputs of the gate-training images."""
    settings = cfg.gate_training["cache"]
    dataset = CocoDetection(load_split(data_dir, settings["split"]))
    images = settings["images"] or len(dataset)
    if images > len(dataset):
        raise ValueError(f"mgs.cache.images = {images} is not allowed: the {settings['split']} split has "
                         f"{len(dataset)} images")
    loader = DataLoader(Subset(dataset, range(images)), batch_size=settings["batch_size"],
                        collate_fn=DetrCollate(image_processor(cfg.input), with_labels=True))
    model = load_detr(model_dir, device=job_device())
    start = time.perf_counter()
    cache = build_front_end_cache(model, loader, total=len(loader))
    cache.save(out_path)
    info = {"images": len(cache), "tokens": cache.features.shape[0], "boxes": cache.label_classes.shape[0],
            "megabytes": out_path.stat().st_size / 1e6, "seconds": time.perf_counter() - start}
    run.log_metrics(info)
    log.info("cached the front end of %d %s images (%d tokens, %.0f MB) in %.0f s", info["images"],
             settings["split"], info["tokens"], info["megabytes"], info["seconds"])
    return info


def gated_block_names(cfg: StudyConfig, model: DetrForObjectDetection) -> list[str]:
    blocks = cfg.mgs["blocks"]
    return list(ffn_blocks(model)) if blocks == "all" else list(blocks)


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal digests, unchanged weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def mgs_train_stage(cfg: StudyConfig, objective: str, target: float, model_dir: Path, cache_path: Path,
                    gates_path: Path, training_path: Path, run: StageRun) -> dict:
    """Stage `mgs_train`: gates for one objective and sparsity target on the frozen model, saved with their
    training record."""
    mgs = cfg.mgs
    settings = GateTraining(target=target, objective=objective, **cfg.gate_training["training"])
    model = load_detr(model_dir, device=job_device())
    # Every setting is checked (block names, group size against the FFN width) before the cache is read.
    gates = make_gates(ffn_blocks(model), gated_block_names(cfg, model), mgs["group_size"],
                       mgs["gate_threshold"])
    gates = {name: gate.to(model.device) for name, gate in gates.items()}
    cache = FrontEndCache.load(cache_path)
    before = weights_digest(model)
    # Outside the outputs, so an interrupted job resumes (Snakemake removes a failed job's outputs); named
    # after the settings and the dense weights, so a checkpoint is never resumed on another model.
    checkpoint = (cfg.results_dir / "checkpoints"
                  / f"mgs-{objective}-{target}-{cfg.params_hash('mgs_train')}-{before[:12]}.pt")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    log.info("training %d gates (G = %d, %s objective) toward %.0f %% induced sparsity on %d cached images",
             len(gates), mgs["group_size"], objective, 100 * target, len(cache))
    final = train_gates(model, gates, cache, settings, cfg.seed, checkpoint,
                        log_step=lambda step, metrics: run.log_metrics(metrics, step=step))
    curve = final.pop("curve")
    calibration = None
    if settings.calibration_images:
        held_out = list(range(len(cache) - settings.calibration_images, len(cache)))
        calibration = calibrate_gates(model, gates, cache, held_out, target, settings.batch_size)
        run.log_metrics({f"calibration_{k}": v for k, v in calibration.items()})
    if weights_digest(model) != before:
        raise RuntimeError("gate training changed the dense model's weights; only the gates may train")
    record = {"target": target, "objective": objective, "group_size": mgs["group_size"],
              "gate_threshold": mgs["gate_threshold"], "blocks": sorted(gates), "images": len(cache),
              "settings": cfg.gate_training["training"], "final": final, "calibration": calibration, "curve": curve,
              "dense_weights_sha256": before,
              "mlflow_run_id": run.run_id}
    save_gates(gates_path, gates, {"target": target, "objective": objective, "model": str(model_dir),
                                   "mlflow_run_id": run.run_id})
    write_json(training_path, record)
    checkpoint.unlink(missing_ok=True)
    run.log_metrics({"train_seconds": final["train_seconds"], "final_induced_sparsity": final["induced_sparsity"]})
    log.info("%s gates for target %.2f: last training batch at sparsity %.3f after %d steps (%.0f s)", objective,
             target, final["induced_sparsity"], final["steps"], final["train_seconds"])
    return record


def mgs_evaluate_stage(cfg: StudyConfig, objective: str, target: float, model_dir: Path, data_dir: Path,
                       gates_path: Path, training_path: Path, detections_path: Path, row_path: Path | None,
                       run: StageRun, sharding: Sharding = WHOLE_SPLIT) -> dict | None:
    """Stage `mgs_evaluate`: the gated model's row, measured by the same evaluation as every method (a shard
    job writes its partial evaluation only)."""
    training = json.loads(Path(training_path).read_text())
    if (training["objective"], training["target"]) != (objective, target):
        raise ValueError(f"{training_path} records {training['objective']} gates for target {training['target']}, "
                         f"not {objective} gates for {target}")
    device = job_device()
    gates = {name: gate.to(device) for name, gate in load_gates(gates_path).items()}
    data = evaluation_split(cfg, data_dir, sharding=sharding)
    model = load_detr(model_dir, device=device)
    measured = evaluate_policies(model, data, gates, detections_path)
    if measured is None:
        return None
    setting = {k: training[k] for k in ("target", "objective", "group_size", "gate_threshold", "blocks")}
    row = {"method": "mgs", "setting": setting, **measured, "gates": str(gates_path),
           "training": {"steps": training["final"]["steps"], "train_seconds": training["final"]["train_seconds"],
                        "induced_sparsity": training["final"]["induced_sparsity"],
                        "calibration": training["calibration"], "mlflow_run_id": training["mlflow_run_id"]},
           "mlflow_run_id": run.run_id}
    write_json(row_path, row)
    run.log_metrics({**row_metrics(row),
                     **{f"induced_sparsity.{n}": v for n, v in row["induced_sparsity"]["per_block"].items()}})
    run.log_artifact(row_path)
    log.info("mgs %s, target %.2f: induced sparsity %.3f, AP %.4f (AP50 %.4f)", objective, target,
             row["induced_sparsity"]["overall"], row["AP"], row["AP50"])
    return row
