"""What the bootstrap intervals cost: COCOeval's matching once per detections file, then the resamples (only the
accumulation, vectorised), on the study's own dense detections of the evaluation split. The matching is timed
for area 'all' alone (what `match_detections` runs) and, alternating with it, for COCOeval's four area ranges (as
it ran before): the same matches, at a quarter of the work.

    python benchmarks/bootstrap_cost.py                  # default study, after `make study`
    python benchmarks/bootstrap_cost.py --resamples 1000 --repeats 3
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from detr_sparsity.evaluation.bootstrap import match_detections, matches_of, resample_weights, resampled_ap
from detr_sparsity.evaluation.coco_eval import evaluated_images
from detr_sparsity.pipeline import path

from _common import arguments, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "bootstrap_cost", repeats=3)
    parser.add_argument("--resamples", type=int, default=1000)
    args, cfg = parse(parser, argv)
    row_path = path("evaluate", "row", cfg.name, method="dense")
    if not row_path.is_file():
        print(f"error: no dense row at {row_path}; run the pipeline first (make study)", file=sys.stderr)
        return 2
    row = json.loads(row_path.read_text())
    matching, matching_all_areas, resampling = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        every_area = matches_of(evaluated_images(row["annotations"], row["detections"]))
        matching_all_areas.append(time.perf_counter() - start)
        start = time.perf_counter()
        matched = match_detections(row["annotations"], row["detections"])
        matching.append(time.perf_counter() - start)
        if not _same(matched, every_area):
            print("error: matching area 'all' alone gave other matches than with every area range", file=sys.stderr)
            return 1
        weights = resample_weights(len(matched.image_ids), args.resamples, cfg.seed)
        start = time.perf_counter()
        spread = resampled_ap(matched, weights)
        resampling.append(time.perf_counter() - start)
    detections = sum(len(c.scores) for c in matched.categories)
    result = {"benchmark": "bootstrap_cost", "study": cfg.name, "images": len(matched.image_ids),
              "detections": detections, "resamples": args.resamples, "repeats": args.repeats,
              "matching_seconds": matching, "resampling_seconds": resampling,
              "median_matching_seconds": statistics.median(matching),
              "matching_seconds_every_area_range": matching_all_areas,
              "median_matching_seconds_every_area_range": statistics.median(matching_all_areas),
              "median_resampling_seconds": statistics.median(resampling),
              "AP_interval": [float(np.percentile(spread["AP"], 2.5)), float(np.percentile(spread["AP"], 97.5))]}
    return report(result, args.out, cfg.name, f"{detections} detections on {result['images']} images: matching "
                  f"{result['median_matching_seconds']:.2f} s once (every area range: "
                  f"{result['median_matching_seconds_every_area_range']:.2f} s), {args.resamples} resamples "
                  f"{result['median_resampling_seconds']:.2f} s")


def _same(a, b) -> bool:
    """Two matchings hold the same detections, flags and ground-truth counts, category by category."""
    return a.image_ids == b.image_ids and len(a.categories) == len(b.categories) and all(
        x.category_id == y.category_id and all(np.array_equal(getattr(x, f), getattr(y, f))
                                               for f in ("scores", "image_index", "matched", "ignored", "ground_truth"))
        for x, y in zip(a.categories, b.categories))


if __name__ == "__main__":
    sys.exit(main())
