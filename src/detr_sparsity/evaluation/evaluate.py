"""Evaluating a configuration: detections on the evaluation split with FFN policies installed, their COCO AP,
the sparsity the wrappers counted and the FLOPs as run, as one row of summary.json.

`evaluate_policies` is the one evaluation used by every method (dense, top-k / random, SIBS, MGS: each stage
installs its policies). Each job writes only its own files; the `summary` stage gathers the rows, so parallel
evaluations never write to one file. An evaluation may also run sharded (`evaluation.shards`): N jobs detect
a shard each, and one job gathers them into the same row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from torch.utils.data import DataLoader, Subset
from transformers import DetrForObjectDetection, DetrImageProcessorPil

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, Split, image_processor, load_split
from detr_sparsity.evaluation.coco_eval import AP_METRICS, GroundTruthError, coco_ap, ground_truth_problem
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.flops import FLOPS_CONVENTION, FlopCount, flops_per_image
from detr_sparsity.evaluation.front_end import EvaluationFrontEnd
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding, gather_partials, shard_batches, write_partial
from detr_sparsity.sparsity.ffn import FFNSparsity, Observer, sparse_ffns
from detr_sparsity.sparsity.policies import Policy

log = logging.getLogger(__name__)

@dataclass
class EvaluationSplit:
    """The split a study is evaluated on, with its loader (DETR's resize and padding, no labels): the whole
    split, or one shard's batches of it; and the loader's batches through the front end, as the job's evaluation
    passes run them (kept across its passes where they fit `evaluate.front_end_memory_mb`)."""

    split: Split
    processor: DetrImageProcessorPil
    loader: DataLoader
    front_end: EvaluationFrontEnd
    sharding: Sharding = WHOLE_SPLIT
    images: int = 0  # in the whole split, whichever part this job runs


def evaluation_split(cfg: StudyConfig, data_dir: Path, split_name: str | None = None,
                     sharding: Sharding = WHOLE_SPLIT, scored: bool = True) -> EvaluationSplit:
    """The split's loader; a split to be `scored` (COCO AP) must hold ground truth that COCOeval can score."""
    split = load_split(data_dir, split_name or cfg.evaluate["split"])
    processor = image_processor(cfg.input)
    dataset = CocoDetection(split)
    # Before any detection: ground truth that nothing can be scored against gives AP -1, which is no result.
    problem = ground_truth_problem([a for anns in dataset.annotations.values() for a in anns], dataset.categories)
    if scored and problem is not None:
        raise GroundTruthError(f"cannot evaluate on the {split.name} split ({split.annotations}): {problem}")
    batch_size = cfg.evaluate["batch_size"]
    part = dataset
    if sharding.detects_shard:  # whole batches only: each is exactly a batch of the unsharded job
        total = -(-len(dataset) // batch_size)
        batches = shard_batches(total, sharding)
        part = Subset(dataset, range(batches.start * batch_size, min(batches.stop * batch_size, len(dataset))))
        log.info("%s: batches %d-%d of %d (%d images)", sharding.describe(), batches.start + 1, batches.stop, total,
                 len(part))
    loader = DataLoader(part, batch_size=batch_size, collate_fn=DetrCollate(processor, with_labels=False))
    front_end = EvaluationFrontEnd(loader, cfg.evaluate["front_end_memory_mb"] * 2**20)
    return EvaluationSplit(split, processor, loader, front_end, sharding, len(dataset))


def evaluate_policies(model: DetrForObjectDetection, data: EvaluationSplit, policies: Mapping[str, Policy],
                      detections_path: Path, check: Callable[[list[dict]], dict] | None = None) -> dict | None:
    """Detect with `policies` installed (blocks not named run dense), score with COCOeval, count FLOPs.

    Returns the measured part of a row: AP metrics, natural / induced / effective sparsity, FLOPs. A shard job
    writes its partial evaluation at `detections_path` instead and returns None; a gather job merges the
    shards' partials instead of detecting.

    `check`, a stage's own check of the detections (SIBS: the shrunk FFN reproduces them), sees them before
    anything is written, so a check that raises leaves no output. What it returns joins the row, or is attached
    to a shard's partial evaluation for the gather job.
    """
    counted = run_evaluation(model, data, policies, detections_path, check)
    return None if counted is None else measured_row(data, detections_path, *counted)


def run_evaluation(model: DetrForObjectDetection, data: EvaluationSplit, policies: Mapping[str, Policy],
                   detections_path: Path, check: Callable[[list[dict]], dict] | None = None,
                   observer: Observer | None = None) -> tuple[FlopCount, FFNSparsity, dict] | None:
    """`evaluate_policies` up to the row: the detections written at `detections_path`; returns what was counted
    (FLOPs, the wrappers' counts, the check's result), or None for a shard job. `observer` sees every block's
    activations (`sparsity.ffn.Observer`)."""
    flops = FlopCount()
    checked: dict = {}
    # The front end's stand-in first: the FFN wrappers read the encoder's token mask from its output.
    with data.front_end.serving(model) as batches, sparse_ffns(model, policies) as sparsity:
        if observer is not None:
            sparsity.add_observer(observer)
        if data.sharding.gathers:
            detections = gather_partials(data.sharding.partials_for(detections_path), flops, sparsity)
        else:
            detections = detect(model, data.processor, batches, total=len(data.loader),
                                around_forward=lambda batch: flops.forward(batch["pixel_values"],
                                                                           batch["front_end_flops"]),
                                start_batch=lambda batch: [p.start_batch(batch["image_ids"]) for p in policies.values()])
            if check is not None:
                checked = check(detections)
            if data.sharding.detects_shard:
                write_partial(detections_path, detections, flops, sparsity, checked)
                return None
    if flops.images != data.images:
        raise RuntimeError(f"{flops.images} images were evaluated, the {data.split.name} split holds {data.images}")
    write_json(detections_path, detections, indent=None)
    return flops, sparsity, checked


def measured_row(data: EvaluationSplit, detections_path: Path, flops: FlopCount, sparsity: FFNSparsity,
                 checked: dict, ap: dict | None = None) -> dict:
    """The measured part of a row, from the detections at `detections_path` and the counts of their evaluation;
    `ap`: their COCO AP where already scored (the same detections in another file)."""
    per_image = flops_per_image(flops, sparsity)
    return {
        **(ap if ap is not None else coco_ap(data.split.annotations, detections_path)),
        "natural_sparsity": sparsity.natural_sparsity(),
        "induced_sparsity": sparsity.induced_sparsity(),
        "effective_sparsity": sparsity.effective_sparsity(),
        "ffn_flops": per_image["ffn"],
        "total_flops": per_image["total"],
        "flops_convention": FLOPS_CONVENTION,
        "images": data.images,
        "detections": str(detections_path),
        "annotations": str(data.split.annotations),
        # What the split covers, where it is less than its source (COCO: a part of val2017).
        **({"split_note": data.split.note} if data.split.note else {}),
        **checked,
    }


def row_metrics(row: dict) -> dict[str, float]:
    """The scalar metrics of a row, as logged to MLflow."""
    return {**{k: row[k] for k in AP_METRICS},
            "natural_sparsity": row["natural_sparsity"]["overall"],
            "induced_sparsity": row["induced_sparsity"]["overall"],
            "effective_sparsity": row["effective_sparsity"]["overall"],
            "ffn_gflops": row["ffn_flops"]["as_run"] / 1e9, "total_gflops": row["total_flops"]["as_run"] / 1e9}
