"""SIBS (static indicator-based sparsification) and stage `sibs`: one threshold of the sweep.

From the profile, neuron n of block l gets a static indicator (default: its firing frequency on the
calibration split; alternative: its mean activation, in activation units). Neurons whose indicator is
below the threshold tau are skipped for every input, so tau = 0 skips nothing. Because the mask is static,
the FFN can be physically shrunk; the stage checks that the shrunk model gives the masked model's
detections.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation import shards
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split, row_metrics
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.policies import StaticMask
from detr_sparsity.sparsity.profile import load_indicator
from detr_sparsity.sparsity.shrink import shrink_ffns
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)

# Float32 sums over fewer terms in another order: the shrunk model may differ from the masked one by
# rounding only. Scores are probabilities; boxes are in pixels of the original image.
SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE_PX = 0.05
# A query whose two best classes score within rounding of each other may swap labels; its score still agrees.
LABEL_MISMATCH_FRACTION = 1e-3


def merge_checks(checks: list[dict]) -> dict:
    """The shrunk-FFN check over all shards of a split: counts add up, worst differences are the largest."""
    return {"detections": sum(c["detections"] for c in checks),
            "label_mismatches": sum(c["label_mismatches"] for c in checks),
            "max_score_difference": max(c["max_score_difference"] for c in checks),
            "max_box_difference_px": max(c["max_box_difference_px"] for c in checks)}


def reproduced(check: dict, threshold: float) -> dict:
    """`check` (of compare_detections, or merged), unless the shrunk FFN misses the masked detections."""
    if (check["label_mismatches"] > LABEL_MISMATCH_FRACTION * check["detections"]
            or check["max_score_difference"] > SCORE_TOLERANCE
            or check["max_box_difference_px"] > BOX_TOLERANCE_PX):
        raise RuntimeError(f"the shrunk FFN does not reproduce the masked detections at threshold {threshold}: {check}")
    return check


def static_keep_masks(indicators: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Per block, the neurons kept for every input: indicator >= threshold."""
    if threshold < 0:
        raise ValueError(f"threshold = {threshold} is not allowed: must be >= 0")
    return {name: values >= threshold for name, values in indicators.items()}


def compare_detections(masked: list[dict], shrunk: list[dict]) -> dict:
    """How far the shrunk model's detections are from the masked model's (same order: image, then query)."""
    if len(masked) != len(shrunk):
        raise RuntimeError(f"shrunk FFN gave {len(shrunk)} detections, the masked one {len(masked)}")
    return {
        "detections": len(masked),
        "label_mismatches": sum((a["image_id"], a["category_id"]) != (b["image_id"], b["category_id"])
                                for a, b in zip(masked, shrunk)),
        "max_score_difference": max((abs(a["score"] - b["score"]) for a, b in zip(masked, shrunk)), default=0.0),
        "max_box_difference_px": max((abs(x - y) for a, b in zip(masked, shrunk) for x, y in zip(a["bbox"], b["bbox"])),
                                     default=0.0),
    }


def sibs_stage(cfg: StudyConfig, threshold: float, model_dir: Path, data_dir: Path, profile_dir: Path,
               detections_path: Path, row_path: Path | None, run: StageRun,
               sharding: Sharding = WHOLE_SPLIT) -> dict | None:
    """Evaluate SIBS at one threshold; check the physically shrunk FFN against the masked one; write the row.

    Sharded, each shard job checks the shrunk FFN on its own batches and attaches the check to its partial
    evaluation; the gather job merges the checks.
    """
    indicator = cfg.sibs["indicator"]
    keep = static_keep_masks(load_indicator(profile_dir, indicator), threshold)
    data = evaluation_split(cfg, data_dir, sharding=sharding)
    model = load_detr(model_dir, device=job_device())
    hidden = {name: int(k.numel()) for name, k in keep.items()}
    shrinking = {"kept_neurons": {name: int(k.sum()) for name, k in keep.items()}, "hidden": hidden,
                 "parameters_removed": sum((hidden[n] - int(k.sum())) * (2 * model.config.d_model + 1)
                                           for n, k in keep.items())}
    # Shrunk from the plain model, before the evaluation wraps its FFN blocks; a gather job runs no model.
    shrunk = None if sharding.gathers else shrink_ffns(copy.deepcopy(model), keep)

    def shrunk_reproduces(masked: list[dict]) -> dict:
        with torch.no_grad():
            shrunk_detections = detect(shrunk, data.processor, data.loader, total=len(data.loader))
        return {"shrunk_ffn": reproduced({**compare_detections(masked, shrunk_detections), **shrinking}, threshold)}

    measured = evaluate_policies(model, data, {name: StaticMask(k) for name, k in keep.items()}, detections_path,
                                 check=shrunk_reproduces)
    if measured is None:  # a shard job: its check is attached to its partial evaluation
        return None
    if sharding.gathers:  # the shard jobs ran the shrunk model; only their checks are merged here
        merged = merge_checks(shards.attached(sharding.partials_for(detections_path), "shrunk_ffn"))
        check = reproduced({**merged, **shrinking}, threshold)
    else:
        check = measured.pop("shrunk_ffn")

    row = {"method": "sibs", "setting": {"indicator": indicator, "threshold": threshold},
           **measured, "shrunk_ffn": check, "mlflow_run_id": run.run_id}
    write_json(row_path, row)
    run.log_metrics({**row_metrics(row), "shrunk_max_score_difference": check["max_score_difference"],
                     **{f"induced_sparsity.{n}": v for n, v in row["induced_sparsity"]["per_block"].items()}})
    run.log_artifact(row_path)
    log.info("sibs %s >= %s: static sparsity %.3f, AP %.4f (AP50 %.4f); shrunk FFN max score diff %.2g",
             indicator, threshold, row["induced_sparsity"]["overall"], row["AP"], row["AP50"],
             check["max_score_difference"])
    return row
