"""Stage `mgs_cache`: the frozen front end (projected backbone features), the labels and the dense model's
outputs of the gate-training images, computed once for every gate training."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.mgs.front_end import build_front_end_cache
from detr_sparsity.models.load import load_detr
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, data: Path, out: Path) -> None:
    settings = cfg.gate_training["cache"]
    dataset = CocoDetection(load_split(data, settings["split"]))
    images = settings["images"] or len(dataset)
    if images > len(dataset):
        raise ValueError(f"mgs.cache.images = {images} is not allowed: the {settings['split']} split has "
                         f"{len(dataset)} images")
    loader = DataLoader(Subset(dataset, range(images)), batch_size=settings["batch_size"],
                        collate_fn=DetrCollate(image_processor(cfg.input), with_labels=True))
    detr = load_detr(model, device=job_device())
    start = time.perf_counter()
    cache = build_front_end_cache(detr, loader, total=len(loader))
    cache.save(out)
    info = {"images": len(cache), "tokens": cache.features.shape[0], "boxes": cache.label_classes.shape[0],
            "megabytes": out.stat().st_size / 1e6, "seconds": time.perf_counter() - start}
    tracked.log_metrics(info)
    log.info("cached the front end of %d %s images (%d tokens, %.0f MB) in %.0f s", info["images"],
             settings["split"], info["tokens"], info["megabytes"], info["seconds"])
