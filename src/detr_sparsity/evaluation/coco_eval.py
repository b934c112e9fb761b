"""COCO bbox AP from a detections file and a ground-truth file, with pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The first six entries of COCOeval.stats, in order.
AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class GroundTruthError(ValueError):
    """Ground truth that COCOeval can score nothing against: its AP would be -1, a non-result."""


def ground_truth_problem(annotations: list[dict], categories: list[dict]) -> str | None:
    """Why COCOeval would score nothing against this ground truth (every AP -1), or None.

    COCOeval scores only non-crowd annotations of the file's own categories; with none, every AP is -1.
    """
    if not annotations:
        return "its ground truth is empty (annotations: [])"
    category_ids = {c["id"] for c in categories}
    scored = [a for a in annotations if a.get("category_id") in category_ids]
    if not scored:
        found = sorted({a.get("category_id") for a in annotations}, key=str)
        return (f"none of its {len(annotations)} annotations has a category of the file (their category_ids: "
                f"{', '.join(map(str, found[:10]))}; categories: "
                f"{', '.join(str(c) for c in sorted(category_ids, key=str)[:10]) or 'none'})")
    if all(a.get("iscrowd", 0) for a in scored):
        return f"all {len(scored)} of its annotations are crowd regions, which COCOeval does not score"
    return None


def evaluated_images(annotations: str | Path, detections: str | Path,
                     area_ranges: tuple[str, ...] | None = None) -> COCOeval:
    """COCOeval (bbox) of `detections` against `annotations` after its per-image matching, evaluate(), only.

    `area_ranges`: the area ranges matched, by COCOeval's labels ('all', 'small', 'medium', 'large'); None for all
    four, as AP_small, AP_medium and AP_large need. Each range is matched on its own, so leaving some out changes
    nothing of the others and saves their share of evaluate() (three quarters for 'all' alone).

    Ground truth that nothing can be scored against is an error (`ground_truth_problem`), and so is an empty
    detections file.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; the stage logs instead
        gt = COCO(str(annotations))
        problem = ground_truth_problem(gt.dataset.get("annotations", []), gt.dataset.get("categories", []))
        if problem is not None:
            raise GroundTruthError(f"cannot score detections against {annotations}: {problem}")
        results = json.loads(Path(detections).read_text())
        if not results:
            raise ValueError(f"{detections} holds no detections; COCOeval needs at least one")
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if area_ranges is not None:
            p = evaluator.params
            kept = [p.areaRngLbl.index(label) for label in area_ranges]
            p.areaRng, p.areaRngLbl = [p.areaRng[i] for i in kept], [p.areaRngLbl[i] for i in kept]
        evaluator.evaluate()
    return evaluator


def coco_ap(annotations: str | Path, detections: str | Path) -> dict[str, float]:
    """The six AP metrics of `detections` (COCO results JSON) against `annotations` (COCO instances JSON).

    Ground truth that nothing can be scored against is an error (`ground_truth_problem`); COCOeval's -1 for an area
    range without ground truth is kept, not hidden.
    """
    evaluator = evaluated_images(annotations, detections)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(AP_METRICS)}
