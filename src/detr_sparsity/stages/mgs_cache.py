"""Stage `mgs_cache`: the frozen front end (projected backbone features), the labels and the dense model's
outputs of the gate-training images, and every FFN block's dense input on their real tokens, all from one dense
pass, computed once for every gate training."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.device import job_device
from detr_sparsity.mgs.block_inputs import build_gate_training_caches
from detr_sparsity.models.load import load_detr
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, data: Path, out: Path, block_inputs: Path) -> None:
    settings = cfg.gate_training["cache"]
    dataset = CocoDetection(load_split(data, settings["split"]))
    images = settings["images"] or len(dataset)
    if images > len(dataset):
        raise ValueError(f"mgs.cache.images = {images} is not allowed: the {settings['split']} split has "
                         f"{len(dataset)} images")
    tokens_per_image = settings["tokens_per_image"]
    loader = DataLoader(Subset(dataset, range(images)), batch_size=settings["batch_size"],
                        collate_fn=DetrCollate(image_processor(cfg.input), with_labels=True))
    detr = load_detr(model, device=job_device())
    start = time.perf_counter()
    cache, inputs = build_gate_training_caches(detr, loader, tokens_per_image=tokens_per_image, seed=cfg.seed,
                                               total=len(loader))
    cache.save(out)
    inputs.save(block_inputs)
    tokens = inputs.tokens()
    info = {"images": len(cache), "tokens": cache.features.shape[0], "boxes": cache.label_classes.shape[0],
            "megabytes": out.stat().st_size / 1e6, "block_inputs_megabytes": block_inputs.stat().st_size / 1e6,
            "block_inputs_tokens_per_image": tokens_per_image, "seconds": time.perf_counter() - start,
            **{f"block_input_tokens.{name}": count for name, count in tokens.items()}}
    tracked.log_metrics(info)
    log.info("cached the front end of %d %s images (%d tokens, %.0f MB) in %.0f s", info["images"],
             settings["split"], info["tokens"], info["megabytes"], info["seconds"])
    log.info("cached the FFN blocks' inputs (%s; %.0f MB): %s",
             f"at most {tokens_per_image} tokens per image and block" if tokens_per_image else "every real token",
             info["block_inputs_megabytes"], ", ".join(f"{name} {count}" for name, count in tokens.items()))
