"""The study's headline comparisons with 95 % bootstrap intervals over the evaluation images.

The evaluation split is small (300 images in the default study), so a difference of a point of AP between two
methods can be noise. Every comparison here resamples the same image sets for both sides (paired), from
detection files the pipeline wrote: each MGS gate set (every objective and protocol) and each oracle against the
dense model (AP retention, the ratio), and each MGS gate set against the top-k and threshold oracles at the same
target and scope (the difference). COCOeval's per-image matching runs once per detection file; a resample only
repeats the accumulation (`evaluation.bootstrap`). The files are matched and resampled `processes` at a time, each
with the same resample weights: the same intervals as one at a time.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from detr_sparsity.evaluation.bootstrap import Resampled, match_detections, paired, resample_weights, resampled
from detr_sparsity.sparsity.blocks import ALL_BLOCKS

log = logging.getLogger(__name__)

ORACLES = ("topk", "threshold")


def describe(row: dict) -> dict:
    """What a compared row is: its method and the settings that tell it apart."""
    setting = row["setting"] or {}
    keys = ("objective", "protocol", "target", "scope", "keep_ratio")
    return {"method": row["method"], **{k: setting[k] for k in keys if k in setting}}


def _target(row: dict) -> float:
    setting = row["setting"]
    return setting["target"] if "target" in setting and row["method"] == "mgs" else round(1 - setting["keep_ratio"], 12)


def _scope(row: dict) -> str:
    return row["setting"].get("scope", ALL_BLOCKS)


def compared_pairs(rows: list[dict]) -> list[tuple[dict, dict, str]]:
    """(row, reference, kind) for every headline comparison: `retention` against the dense row, `against_oracle`
    against an oracle at the same target and scope."""
    dense = next(r for r in rows if r["method"] == "dense")
    gated = [r for r in rows if r["method"] == "mgs"]
    # The paper's own setting has no target (uncalibrated): compared with dense only.
    targeted = [r for r in gated if r["setting"]["target"] is not None]
    targets = {(_target(r), _scope(r)) for r in targeted}
    oracles = [r for r in rows if r["method"] in ORACLES and (_target(r), _scope(r)) in targets]
    pairs = [(r, dense, "retention") for r in gated + oracles]
    for row in targeted:
        pairs += [(row, oracle, "against_oracle") for oracle in oracles
                  if abs(_target(oracle) - _target(row)) < 1e-9 and _scope(oracle) == _scope(row)]
    return pairs


def _resampled_file(annotations: str, weights: np.ndarray, detections: str) -> Resampled:
    return resampled(match_detections(annotations, detections), weights)


def comparisons(rows: list[dict], resamples: int, seed: int, level: float, processes: int = 1) -> dict:
    """Every headline comparison of the study's rows with its paired bootstrap interval."""
    pairs = compared_pairs(rows)
    annotations = {r["annotations"] for pair in pairs for r in pair[:2]}
    if len(annotations) > 1:
        raise ValueError(f"the compared rows were scored against different annotations: {sorted(annotations)}")
    files = list(dict.fromkeys(r["detections"] for pair in pairs for r in pair[:2]))
    # A pool only where it has more than one file to share out (the first is matched here, for the image count).
    processes = processes if len(files) > 2 else 1
    weights, cache = None, {}
    if files:
        (annotation,) = annotations
        first = match_detections(annotation, files[0])
        weights = resample_weights(len(first.image_ids), resamples, seed)
        cache[files[0]] = resampled(first, weights)
        each = partial(_resampled_file, annotation, weights)
        if processes > 1:
            # fork: the workers need only this module's functions and the weights, and start at once.
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
                cache.update(zip(files[1:], pool.map(each, files[1:])))
        else:
            cache.update(zip(files[1:], map(each, files[1:])))
    found = [{"kind": kind, "row": describe(row), "reference": describe(reference),
              **paired(cache[row["detections"]], cache[reference["detections"]], level)}
             for row, reference, kind in pairs]
    log.info("%d comparisons with %d resamples over %d detection files (%d at a time)", len(found), resamples,
             len(cache), processes)
    return {"level": level, "resamples": resamples, "seed": seed,
            "images": 0 if weights is None else int(weights.shape[1]),
            "detections": sorted(str(Path(p)) for p in cache), "comparisons": found}
