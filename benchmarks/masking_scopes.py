"""The masking sweep's scopes evaluated together (`evaluation.scopes`: the scopes whose masks drop nothing taken
from one dense pass) against each scope evaluated alone (`evaluate_policies`, as the stage did before), on the
study's dense model and evaluation split, at points of the sweep.

For each point (method and keep-ratio; the threshold oracle calibrated as the stage calibrates it, outside the
timing) both variants evaluate all of the stage's scopes (all blocks, then each block alone), alternating,
`--repeats` times each; their rows must be equal key for key (the detections files' paths aside).

    python benchmarks/masking_scopes.py --points topk:0.5 topk:0.1 random:0.5 threshold:0.5

Writes results/<study>/benchmark/masking_scopes.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.evaluation.scopes import evaluate_scopes
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.blocks import ALL_BLOCKS
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, masking_points, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "masking_scopes", repeats=3, threads="evaluations")
    parser.add_argument("--points", nargs="+", default=["topk:0.5", "topk:0.1", "random:0.5", "threshold:0.5"],
                        metavar="METHOD:KEEP_RATIO")
    args, cfg = parse(parser, argv)
    data = evaluation_split(cfg, path("data", "out", cfg.name))
    model = load_detr(path("model", "out", cfg.name))
    scopes = [ALL_BLOCKS, *ffn_blocks(model)]
    points = []
    for method, keep_ratio, policies_for in masking_points(cfg, model, args.points):
        seconds: dict[str, list[float]] = {"each_scope_alone": [], "together": []}
        rows = {}
        with tempfile.TemporaryDirectory() as scratch:
            for _ in range(args.repeats):
                for variant in seconds:
                    out = Path(scratch) / variant
                    start = time.perf_counter()
                    if variant == "together":
                        found = evaluate_scopes(model, data, scopes, policies_for, out)
                    else:
                        found = {scope: evaluate_policies(model, data, policies_for(scope), out / f"{scope}.json")
                                 for scope in scopes}
                    seconds[variant].append(time.perf_counter() - start)
                    rows[variant] = {scope: {k: v for k, v in row.items() if k != "detections"}
                                     for scope, row in found.items()}
        if rows["together"] != rows["each_scope_alone"]:
            print(f"error: {method}:{keep_ratio}: the scopes evaluated together gave other rows than each alone",
                  file=sys.stderr)
            return 1
        drop_nothing = [scope for scope, row in rows["together"].items()
                        if row["effective_sparsity"]["overall"] == row["natural_sparsity"]["overall"]]
        medians = {variant: statistics.median(s) for variant, s in seconds.items()}
        points.append({"method": method, "keep_ratio": keep_ratio, "scopes": len(scopes),
                       "scopes_dropping_nothing": drop_nothing, "seconds": seconds, "median_seconds": medians,
                       "speedup": medians["each_scope_alone"] / medians["together"], "same_rows": True})
        print(f"{method}:{keep_ratio}: {len(drop_nothing)} of {len(scopes)} scopes drop nothing; "
              f"{medians['each_scope_alone']:.1f} s each alone, {medians['together']:.1f} s together", file=sys.stderr)
    result = {"benchmark": "masking_scopes", "study": cfg.name, "images": data.images, "threads": args.threads,
              "repeats": args.repeats, "points": points}
    return report(result, args.out, cfg.name, "; ".join(
        f"{p['method']} {p['keep_ratio']}: {p['speedup']:.2f}x ({len(p['scopes_dropping_nothing'])} of {p['scopes']} "
        "scopes from the dense pass)" for p in points))


if __name__ == "__main__":
    sys.exit(main())
