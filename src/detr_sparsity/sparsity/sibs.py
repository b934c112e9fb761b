"""SIBS (static indicator-based sparsification): static keep-masks from the profile's indicators, and the check
that the physically shrunk FFN gives the masked model's detections.

From the profile, neuron n of block l gets a static indicator (default: its firing frequency on the
calibration split; alternative: its mean activation, in activation units). Neurons whose indicator is
below the threshold tau are skipped for every input, so tau = 0 skips nothing. Because the mask is static,
the FFN can be physically shrunk; stage `sibs` checks that the shrunk model gives the masked model's detections.
"""

from __future__ import annotations

import torch

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


def shrinking(keep: dict[str, torch.Tensor], d_model: int) -> dict:
    """What shrinking the FFNs to `keep` removes: the kept neurons and width per block, and the parameters
    (a neuron's fc1 row and bias, and its fc2 column)."""
    hidden = {name: int(k.numel()) for name, k in keep.items()}
    kept = {name: int(k.sum()) for name, k in keep.items()}
    return {"kept_neurons": kept, "hidden": hidden,
            "parameters_removed": sum((hidden[n] - kept[n]) * (2 * d_model + 1) for n in keep)}
