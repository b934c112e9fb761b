"""An evaluation job's passes from the split's front end kept in memory after its first pass (`evaluation.front_end`,
`evaluate.front_end_memory_mb` as in params.yaml) against every pass preparing the images and running the front end
again (`front_end_memory_mb: 0`, the work of the stage before), on the study's dense model and evaluation split, at
points of the masking sweep.

For each point (method and keep-ratio; the threshold oracle calibrated as the stage calibrates it, outside the
timing) both variants evaluate all of the stage's scopes as the stage does (`evaluate_scopes`), each from a new
split as a job starts, alternating, `--repeats` times each; their rows must be equal key for key (the detections
files' paths aside) and their detections byte for byte.

    python benchmarks/evaluation_front_end.py --points random:0.5 topk:0.1 threshold:0.5

Writes results/<study>/benchmark/evaluation_front_end.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.evaluation.front_end import EvaluationFrontEnd
from detr_sparsity.evaluation.scopes import evaluate_scopes
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.blocks import ALL_BLOCKS
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, masking_points, parse, report

VARIANTS = ("recomputed_every_pass", "kept")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "evaluation_front_end", repeats=3, threads="evaluations")
    parser.add_argument("--points", nargs="+", default=["random:0.5", "topk:0.1", "threshold:0.5"],
                        metavar="METHOD:KEEP_RATIO")
    args, cfg = parse(parser, argv)
    data_dir = path("data", "out", cfg.name)
    memory_mb = cfg.evaluate["front_end_memory_mb"]
    model = load_detr(path("model", "out", cfg.name))
    scopes = [ALL_BLOCKS, *ffn_blocks(model)]
    points = []
    for method, keep_ratio, policies_for in masking_points(cfg, model, args.points):
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        rows, detections = {}, {}
        with tempfile.TemporaryDirectory() as scratch:
            for _ in range(args.repeats):
                for variant in VARIANTS:
                    out = Path(scratch) / variant
                    start = time.perf_counter()
                    data = evaluation_split(cfg, data_dir)  # a job's split: nothing kept yet
                    if variant == "recomputed_every_pass":
                        data.front_end = EvaluationFrontEnd(data.loader, memory_bytes=0)
                    found = evaluate_scopes(model, data, scopes, policies_for, out)
                    seconds[variant].append(time.perf_counter() - start)
                    rows[variant] = {scope: {k: v for k, v in row.items() if k != "detections"}
                                     for scope, row in found.items()}
                    detections[variant] = {scope: (out / f"{scope}.json").read_bytes() for scope in scopes}
        if rows["kept"] != rows["recomputed_every_pass"] or detections["kept"] != detections["recomputed_every_pass"]:
            print(f"error: {method}:{keep_ratio}: the kept front end gave other rows or detections", file=sys.stderr)
            return 1
        medians = {variant: statistics.median(s) for variant, s in seconds.items()}
        points.append({"method": method, "keep_ratio": keep_ratio, "scopes": len(scopes), "seconds": seconds,
                       "median_seconds": medians, "speedup": medians["recomputed_every_pass"] / medians["kept"],
                       "same_rows_and_detections": True})
        print(f"{method}:{keep_ratio}: {medians['recomputed_every_pass']:.1f} s recomputed every pass, "
              f"{medians['kept']:.1f} s kept", file=sys.stderr)
    result = {"benchmark": "evaluation_front_end", "study": cfg.name, "images": data.images,
              "front_end_memory_mb": memory_mb, "threads": args.threads, "repeats": args.repeats, "points": points}
    return report(result, args.out, cfg.name, "; ".join(
        f"{p['method']} {p['keep_ratio']}: {p['speedup']:.2f}x" for p in points))


if __name__ == "__main__":
    sys.exit(main())
