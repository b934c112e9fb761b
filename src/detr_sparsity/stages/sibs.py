"""Stage `sibs`: one threshold of the SIBS sweep, with the physically shrunk FFN checked against the masks.

Sharded, each shard job checks the shrunk FFN on its own batches and attaches the check to its partial
evaluation; the gather job merges the checks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation import shards
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.policies import StaticMask
from detr_sparsity.sparsity.profile import load_indicator
from detr_sparsity.sparsity.shrink import shrink_ffns
from detr_sparsity.sparsity.sibs import compare_detections, merge_checks, reproduced, shrinking, static_keep_masks
from detr_sparsity.stages.rows import per_block_metrics, record_row
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, threshold: float, model: Path, data: Path, neurons: Path,
              detections: Path, row: Path | None, sharding: Sharding = WHOLE_SPLIT) -> None:
    indicator = cfg.sibs["indicator"]
    keep = static_keep_masks(load_indicator(neurons, indicator), threshold)
    split = evaluation_split(cfg, data, sharding=sharding)
    detr = load_detr(model, device=job_device())
    shrunk_ffn = shrinking(keep, detr.config.d_model)
    # Shrunk from the plain model, before the evaluation wraps its FFN blocks; a gather job runs no model.
    shrunk = None if sharding.gathers else shrink_ffns(copy.deepcopy(detr), keep)

    def shrunk_reproduces(masked: list[dict]) -> dict:
        with torch.no_grad():
            shrunk_detections = detect(shrunk, split.processor, split.loader, total=len(split.loader))
        return {"shrunk_ffn": reproduced({**compare_detections(masked, shrunk_detections), **shrunk_ffn}, threshold)}

    measured = evaluate_policies(detr, split, {name: StaticMask(k) for name, k in keep.items()}, detections,
                                 check=shrunk_reproduces)
    if measured is None:  # a shard job: its check is attached to its partial evaluation
        return
    if sharding.gathers:  # the shard jobs ran the shrunk model; only their checks are merged here
        merged = merge_checks(shards.attached(sharding.partials_for(detections), "shrunk_ffn"))
        check = reproduced({**merged, **shrunk_ffn}, threshold)
    else:
        check = measured.pop("shrunk_ffn")
    found = {"method": "sibs", "setting": {"indicator": indicator, "threshold": threshold},
             **measured, "shrunk_ffn": check, "mlflow_run_id": tracked.run_id}
    record_row(tracked, row, found, {"shrunk_max_score_difference": check["max_score_difference"],
                                     **per_block_metrics(found)})
