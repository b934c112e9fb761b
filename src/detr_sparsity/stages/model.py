"""Stage `model`: the dense DETR of the study (pretrained here, or fetched), saved with save_pretrained and its
image processor, so that later stages never touch the hub."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from detr_sparsity.atomic import atomic_dir, write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import CocoDetection, image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.models.load import MODEL_INFO, WEIGHTS_DIGESTS, is_local, load_detr, record_weights
from detr_sparsity.models.pretrain import pretrain
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, data: Path, out: Path) -> None:
    model_cfg = cfg.model
    processor = image_processor(cfg.input)
    if model_cfg["source"] == "pretrain":
        train = CocoDetection(load_split(data, "train"))
        torch.manual_seed(cfg.seed)
        model = build_small_detr(small_detr_config(model_cfg["architecture"], train.categories)).to(job_device())
        # Outside the output directory, so an interrupted stage resumes instead of starting over.
        checkpoint = cfg.results_dir / "checkpoints" / f"pretrain-{tracked.params_hash}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        log.info("pretraining a DETR of %.2fM parameters on %d images for %d steps",
                 sum(p.numel() for p in model.parameters()) / 1e6, len(train), model_cfg["pretrain"]["steps"])
        info = pretrain(model, train, processor, model_cfg["pretrain"],
                        cfg.seed, checkpoint, lambda step, m: tracked.log_metrics(m, step=step))
    else:
        name = model_cfg["name_or_path"]
        # A revision selects a commit of a hub repository; a local directory is whatever it holds.
        revision = None if is_local(name) else model_cfg["revision"]
        log.info("loading %s%s", name, f" (revision {revision})" if revision else " (a local directory)")
        model = load_detr(name, revision)
        info = {"name_or_path": name, **({"revision": revision} if revision else {})}
    info["parameters"] = sum(p.numel() for p in model.parameters())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # Checked by every later load of the model (models/load.py), so changed weights never load silently.
        info[WEIGHTS_DIGESTS] = record_weights(tmp)
        write_json(tmp / MODEL_INFO, info)
    log.info("saved the dense DETR to %s", out)
    if model_cfg["source"] == "pretrain":
        checkpoint.unlink(missing_ok=True)
    tracked.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
    tracked.log_artifact(out / "config.json")
    tracked.log_artifact(out / MODEL_INFO)
