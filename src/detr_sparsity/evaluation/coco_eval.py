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


def coco_ap(annotations: str | Path, detections: str | Path) -> dict[str, float]:
    """The six AP metrics of `detections` (COCO results JSON) against `annotations` (COCO instances JSON).

    COCOeval reports -1 for an area range without ground truth; that is kept, not hidden.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; the stage logs instead
        gt = COCO(str(annotations))
        results = json.loads(Path(detections).read_text())
        if not results:
            raise ValueError(f"{detections} holds no detections; COCOeval needs at least one")
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(AP_METRICS)}
