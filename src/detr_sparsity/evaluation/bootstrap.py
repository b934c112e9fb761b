"""Bootstrap intervals over evaluation images for COCO AP and AP50, from one COCOeval matching.

COCOeval matches detections to ground truth image by image (evaluate()); which detection matches which box in
one image does not depend on the other images. A bootstrap resample of images therefore changes only the
accumulation (accumulate()): which detections enter the ranked list, how often, and how many ground-truth boxes
count towards recall. So evaluate() runs once (`match_detections`), and each resample is the accumulation
again, vectorised over resamples in numpy (`resampled_ap`): a resample is a vector of image multiplicities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.cocoeval import COCOeval

from detr_sparsity.evaluation.coco_eval import evaluated_images

# Resamples accumulated at once: bounds memory at about chunk x (detections of the largest category) floats.
RESAMPLE_CHUNK = 256


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections as accumulate() ranks them (area 'all', maxDets 100), and its ground truth.

    Detections are in accumulate()'s order: the concatenation over images in COCOeval's image order, each image's
    at most 100 by descending score, then a stable mergesort by descending score.
    """

    category_id: int
    scores: np.ndarray        # (n,) float
    image_index: np.ndarray   # (n,) int, index into MatchedDetections.image_ids
    matched: np.ndarray       # (T, n) bool: matched to a ground-truth box at each IoU threshold (dtMatches != 0)
    ignored: np.ndarray       # (T, n) bool: dtIgnore (matched to a crowd box, or outside the area range)
    ground_truth: np.ndarray  # (I,) int: non-ignored ground-truth boxes of this category in each image


@dataclass(frozen=True)
class MatchedDetections:
    """COCOeval's per-image matching of one detections file, reduced to what accumulate() needs for AP and AP50."""

    image_ids: tuple[int, ...]    # COCOeval's image order (sorted ids)
    iou_thresholds: np.ndarray    # (T,) .50:.05:.95
    recall_thresholds: np.ndarray  # (R,) 0:.01:1
    categories: tuple[CategoryMatches, ...]  # COCOeval's category order (sorted ids)


def matches_of(evaluator: COCOeval) -> MatchedDetections:
    """The matching of a COCOeval on which evaluate() has run, for area 'all' and maxDets 100."""
    p = evaluator._paramsEval  # the parameters evaluate() ran with; evalImgs is laid out by them
    if not evaluator.evalImgs or not p.useCats or p.maxDets[-1] != 100:
        raise ValueError("matches_of needs a COCOeval after evaluate(), with categories used and maxDets ending "
                         f"at 100 (got useCats={p.useCats}, maxDets={p.maxDets})")
    area = p.areaRngLbl.index("all")
    n_images, n_areas = len(p.imgIds), len(p.areaRng)
    categories = []
    for k, category_id in enumerate(p.catIds):
        per_image = evaluator.evalImgs[(k * n_areas + area) * n_images:(k * n_areas + area + 1) * n_images]
        ground_truth = np.zeros(n_images, dtype=np.int64)
        scores, images, matched, ignored = [], [], [], []
        for i, e in enumerate(per_image):
            if e is None:  # neither ground truth nor detections of this category in this image
                continue
            ground_truth[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            d = len(e["dtScores"])  # evaluateImg already kept the 100 best
            scores.append(np.asarray(e["dtScores"], dtype=float).reshape(d))
            images.append(np.full(d, i, dtype=np.int64))
            matched.append(np.asarray(e["dtMatches"]).reshape(len(p.iouThrs), d) != 0)
            ignored.append(np.asarray(e["dtIgnore"]).reshape(len(p.iouThrs), d).astype(bool))
        if scores:
            scores_all = np.concatenate(scores)
            order = np.argsort(-scores_all, kind="mergesort")  # accumulate()'s sort, ties kept in image order
            entry = CategoryMatches(int(category_id), scores_all[order], np.concatenate(images)[order],
                                    np.concatenate(matched, axis=1)[:, order],
                                    np.concatenate(ignored, axis=1)[:, order], ground_truth)
        else:
            t = len(p.iouThrs)
            entry = CategoryMatches(int(category_id), np.zeros(0), np.zeros(0, dtype=np.int64),
                                    np.zeros((t, 0), dtype=bool), np.zeros((t, 0), dtype=bool), ground_truth)
        categories.append(entry)
    return MatchedDetections(tuple(int(i) for i in p.imgIds), np.asarray(p.iouThrs, dtype=float),
                             np.asarray(p.recThrs, dtype=float), tuple(categories))


def match_detections(annotations: str | Path, detections: str | Path) -> MatchedDetections:
    """COCOeval's per-image matching (evaluate(), once) of `detections` against `annotations` (bbox), for area
    'all' only: AP and AP50 read nothing else."""
    return matches_of(evaluated_images(annotations, detections, area_ranges=("all",)))


def resampled_ap(matched: MatchedDetections, image_weights: np.ndarray) -> dict:
    """AP (IoU .50:.95) and AP50 of the images weighted by `image_weights`, as COCOeval's stats[0] and stats[1].

    `image_weights` is one vector over `matched.image_ids` (floats come back) or a (resamples, images) array
    (arrays of length resamples come back); a weight is an image's multiplicity in a resample, so all ones is
    the original set and a 0/1 vector a subset. As in COCOeval, a category without non-ignored ground truth in
    the weighted set is left out of the mean, and AP is -1 where no category is left.

    This is accumulate() with every detection counted as many times as its image: with T_j / F_j its weighted
    true / false positives up to rank j, recall T_j / N (N the weighted non-ignored ground truth) and precision
    T_j / (F_j + T_j + eps); the precision envelope (the best precision at this rank or later) is read at the first
    rank whose recall reaches each of the 101 recall thresholds, 0 where none does.

    Why a weight equals COCOeval on the resample with the image's copies: a copy of an image has the same
    detections with the same scores and, matching being per image, the same matched and ignore flags. Where the
    copies of one detection are adjacent in the stable sort by score (always so when no other detection of the
    category has the same score), a run of w copies is all true positives, all false positives or all ignored.
    Recall and precision at the run's end are those of the single detection weighted by w. Inside the run the
    precision envelope does not change what is read: in a true-positive run precision rises, so the envelope is
    constant over the run and equals its value at the run's end, which is where the weighted rank sits and where
    recall crosses the same thresholds (between the previous run's end and this one's); in a false-positive or
    ignored run recall does not rise, so no threshold is first reached there, and its precisions are at most the
    one before the run, so no envelope before it changes. A weight 0 removes the detection the same way: its rank
    repeats the previous recall and precision (0 and 0 before any detection), which neither is first to reach a
    threshold nor raises an envelope, so 0/1 weights equal COCOeval on the subset exactly, ties or not, and all
    ones equals COCOeval itself. With tied scores across the copies of two different detections, COCOeval on a
    duplicated file would interleave them by image id, an arbitrary order; the weights give the copies-adjacent one.

    Only ranks of true positives need computing: the envelope read at a recall threshold is the best precision over
    the ranks whose recall reaches it, and the best is always at a true positive (precision only falls after one
    until the next), so detections after a category's last true positive are never looked at.
    """
    weights = np.asarray(image_weights, dtype=float)
    single = weights.ndim == 1
    weights = np.atleast_2d(weights)
    if weights.ndim != 2 or weights.shape[1] != len(matched.image_ids):
        raise ValueError(f"image_weights has shape {np.shape(image_weights)}; it needs one weight per image "
                         f"({len(matched.image_ids)}), as a vector or a (resamples, {len(matched.image_ids)}) array")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("image_weights must be finite and non-negative (an image's multiplicity in a resample)")
    ap = np.empty(len(weights))
    ap50 = np.empty(len(weights))
    for start in range(0, len(weights), RESAMPLE_CHUNK):
        stop = start + RESAMPLE_CHUNK
        ap[start:stop], ap50[start:stop] = _accumulate(matched, weights[start:stop])
    if single:
        return {"AP": float(ap[0]), "AP50": float(ap50[0])}
    return {"AP": ap, "AP50": ap50}


def _accumulate(matched: MatchedDetections, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP and AP50 for each row of `weights`: sums of the precision read at every recall threshold."""
    resamples = len(weights)
    recall_thresholds = matched.recall_thresholds
    n_thresholds = len(recall_thresholds)
    at_50 = int(np.flatnonzero(matched.iou_thresholds == 0.5)[0])
    rows = np.arange(resamples)[:, None]
    precision_sum = np.zeros((resamples, len(matched.iou_thresholds)))
    scored_categories = np.zeros(resamples)
    for category in matched.categories:
        ground_truth = weights @ category.ground_truth.astype(float)  # exact: integer sums far below 2**53
        scored = ground_truth > 0
        if not scored.any():
            continue
        scored_categories += scored
        true_positive = category.matched & ~category.ignored
        if not true_positive.any():  # every recall threshold above 0 unreached, and precision 0 at recall 0
            continue
        horizon = int(np.flatnonzero(true_positive.any(axis=0))[-1]) + 1
        ranked_weights = weights[:, category.image_index[:horizon]]
        seen = np.cumsum(ranked_weights, axis=1)  # weight of the detections up to each rank
        recall_denominator = np.where(scored, ground_truth, 1.0)[:, None]
        for t in range(len(matched.iou_thresholds)):
            hits = np.flatnonzero(true_positive[t, :horizon])
            if hits.size == 0:
                continue
            tp = np.cumsum(ranked_weights[:, hits], axis=1)
            ignored_ranks = np.flatnonzero(category.ignored[t, :horizon])
            ignored_before = np.zeros((resamples, hits.size))
            if ignored_ranks.size:
                ignored_cumulative = np.concatenate(
                    [np.zeros((resamples, 1)), np.cumsum(ranked_weights[:, ignored_ranks], axis=1)], axis=1)
                ignored_before = ignored_cumulative[:, np.searchsorted(ignored_ranks, hits)]
            fp = seen[:, hits] - ignored_before - tp
            recall = tp / recall_denominator
            precision = tp / (fp + tp + np.spacing(1))  # accumulate()'s expression, term for term
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            envelope = np.concatenate([envelope, np.zeros((resamples, 1))], axis=1)  # past the last: precision 0
            # The first true positive reaching recall threshold r is preceded by those with recall < r; count them
            # per row: reached = how many thresholds each true positive's recall reaches, histogram, cumulative sum.
            reached = np.searchsorted(recall_thresholds, recall, side="right")
            histogram = np.bincount((rows * (n_thresholds + 1) + reached).ravel(),
                                    minlength=resamples * (n_thresholds + 1)).reshape(resamples, n_thresholds + 1)
            first = np.cumsum(histogram, axis=1)[:, :n_thresholds]
            read = envelope[rows, first]
            precision_sum[:, t] += np.where(scored, read.sum(axis=1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(scored_categories > 0,
                      precision_sum.sum(axis=1) / (precision_sum.shape[1] * n_thresholds * scored_categories), -1.0)
        ap50 = np.where(scored_categories > 0, precision_sum[:, at_50] / (n_thresholds * scored_categories), -1.0)
    return ap, ap50


def resample_weights(images: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, images) multiplicities: each resample draws `images` images with replacement, from `seed`."""
    if images < 1 or resamples < 1:
        raise ValueError(f"need at least one image and one resample (got images={images}, resamples={resamples})")
    draws = np.random.default_rng(seed).integers(0, images, size=(resamples, images))
    offsets = np.arange(resamples)[:, None] * images
    return np.bincount((draws + offsets).ravel(), minlength=resamples * images).reshape(resamples, images)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of the finite values (NaN, NaN where none is)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = round(100 * (1 - level) / 2, 10)  # 2.5 for 0.95, not 1 - 0.95's 2.500000000000002
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _check_bootstrap(resamples: int, level: float) -> None:
    if not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer (got {resamples!r})")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (got {level!r})")


def _undefined_as_nan(values: np.ndarray) -> np.ndarray:
    return np.where(values < 0, np.nan, values)  # COCOeval's -1: no scored ground truth in the resample


def bootstrap_interval(annotations: str | Path, detections: str | Path, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """Point AP and AP50 of `detections` with percentile bootstrap intervals over the images of `annotations`.

    Returns {AP, AP_low, AP_high, AP50, AP50_low, AP50_high, level, resamples, seed, images, undefined_resamples};
    resamples without scored ground truth (AP -1 in COCOeval) are left out of the intervals and counted.
    """
    _check_bootstrap(resamples, level)
    matched = match_detections(annotations, detections)
    point = resampled_ap(matched, np.ones(len(matched.image_ids)))
    spread = resampled_ap(matched, resample_weights(len(matched.image_ids), resamples, seed))
    result: dict = {}
    for metric in ("AP", "AP50"):
        low, high = _percentile_interval(_undefined_as_nan(spread[metric]), level)
        result |= {metric: point[metric], f"{metric}_low": low, f"{metric}_high": high}
    return result | {"level": level, "resamples": resamples, "seed": seed, "images": len(matched.image_ids),
                     "undefined_resamples": int(np.count_nonzero(spread["AP"] < 0))}


@dataclass(frozen=True)
class Resampled:
    """AP and AP50 of one detections file on the original image set (`point`) and on each resample (`spread`,
    COCOeval's -1 as NaN). Files resampled with the same weights can be paired."""

    point: dict[str, float]
    spread: dict[str, np.ndarray]


def resampled(matched: MatchedDetections, weights: np.ndarray) -> Resampled:
    point = resampled_ap(matched, np.ones(len(matched.image_ids)))
    spread = resampled_ap(matched, weights)
    return Resampled(point, {metric: _undefined_as_nan(spread[metric]) for metric in ("AP", "AP50")})


def paired(a: Resampled, b: Resampled, level: float) -> dict:
    """For each metric M in (AP, AP50): M_a, M_b, M_difference (a - b) and M_ratio (a / b), each with M_..._low and
    M_..._high, and M_ratio_undefined_resamples (M_b 0 there: left out of the ratio's interval). A ratio with
    M_b 0 is NaN."""
    result: dict = {}
    for metric in ("AP", "AP50"):
        point_a, point_b = a.point[metric], b.point[metric]
        spread_a, spread_b = a.spread[metric], b.spread[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(spread_b > 0, spread_a / spread_b, np.nan)
        named = {"a": (point_a, spread_a), "b": (point_b, spread_b),
                 "difference": (point_a - point_b, spread_a - spread_b),
                 "ratio": (point_a / point_b if point_b > 0 else float("nan"), ratio)}
        for name, (point, values) in named.items():
            low, high = _percentile_interval(values, level)
            result |= {f"{metric}_{name}": float(point), f"{metric}_{name}_low": low, f"{metric}_{name}_high": high}
        result[f"{metric}_ratio_undefined_resamples"] = int(np.count_nonzero(np.isfinite(spread_b) & ~(spread_b > 0)))
    return result


def paired_bootstrap_interval(annotations: str | Path, detections_a: str | Path, detections_b: str | Path,
                              resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AP and AP50 of two detection files on the same images, with intervals from the same resampled image sets:
    `paired`'s fields, and level, resamples, seed, images, undefined_resamples (no scored ground truth, left
    out)."""
    _check_bootstrap(resamples, level)
    matched_a = match_detections(annotations, detections_a)
    matched_b = match_detections(annotations, detections_b)
    assert matched_a.image_ids == matched_b.image_ids  # the same annotations give COCOeval the same images
    weights = resample_weights(len(matched_a.image_ids), resamples, seed)
    a, b = resampled(matched_a, weights), resampled(matched_b, weights)
    return paired(a, b, level) | {"level": level, "resamples": resamples, "seed": seed,
                                  "images": len(matched_a.image_ids),
                                  "undefined_resamples": int(np.count_nonzero(np.isnan(a.spread["AP"])))}
