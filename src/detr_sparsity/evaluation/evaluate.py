"""Stage `evaluate`: one method's detections on the evaluation split, its AP, sparsity and FLOPs as one row.

Each evaluation writes only its own files (detections + row); the `summary` stage gathers the rows, so
parallel evaluations never write to one file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.evaluation.coco_eval import coco_ap
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.flops import FLOPS_CONVENTION, FlopCount
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.natural import NaturalSparsityCounter
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)

METHODS = ("dense",)


def evaluate(
    cfg: StudyConfig,
    method: str,
    model_dir: Path,
    data_dir: Path,
    detections_path: Path,
    row_path: Path,
    run: StageRun,
) -> dict:
    """Detect on the evaluation split with `method`, score with COCOeval, write detections and the row."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; allowed: {', '.join(METHODS)}")
    split = load_split(data_dir, cfg.evaluate["split"])
    dataset = CocoDetection(split)
    processor = image_processor(cfg.input)
    loader = DataLoader(dataset, batch_size=cfg.evaluate["batch_size"], collate_fn=DetrCollate(processor, False))
    model = load_detr(model_dir)

    sparsity = NaturalSparsityCounter()
    flops = FlopCount()
    with sparsity.attach(model), flops:
        detections = detect(model, processor, loader, total=len(loader),
                            on_batch=lambda batch, _out: flops.add_images(len(batch["image_ids"])))
    write_json(detections_path, detections, indent=None)
    metrics = coco_ap(split.annotations, detections_path)
    per_image = flops.per_image()
    natural = sparsity.summary()
    row = {
        "method": method,
        "setting": None,
        **metrics,
        "natural_sparsity": natural,
        # The dense policy skips no hidden neuron; effective sparsity is then the natural one.
        "induced_sparsity": {"overall": 0.0, "per_block": {name: 0.0 for name in natural["per_block"]}},
        "effective_sparsity": natural["overall"],
        "ffn_flops": {"dense": per_image["ffn"], "as_run": per_image["ffn"]},
        "total_flops": {"dense": per_image["total"], "as_run": per_image["total"]},
        "flops_convention": FLOPS_CONVENTION,
        "images": len(dataset),
        "detections": str(detections_path),
        "annotations": str(split.annotations),
        "mlflow_run_id": run.run_id,
    }
    write_json(row_path, row)
    run.log_metrics({**metrics, "natural_sparsity": natural["overall"],
                     "ffn_gflops": per_image["ffn"] / 1e9, "total_gflops": per_image["total"] / 1e9})
    run.log_artifact(row_path)
    log.info("%s: AP %.4f AP50 %.4f natural sparsity %.3f", method, metrics["AP"], metrics["AP50"], natural["overall"])
    return row
