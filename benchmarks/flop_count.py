"""What counting FLOPs costs an evaluation: every batch under FlopCounterMode against each input shape counted
twice (`FlopCount.forward`, what evaluations do), on the study's dense model and evaluation split.

Both variants run the pipeline's own `detect()` over the whole split, alternating, `--repeats` times each, with
no counting as the floor; the per-module counts of the two must be equal.

    python benchmarks/flop_count.py --repeats 3

Writes results/<study>/benchmark/flop_count.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext

from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.evaluation.flops import FlopCount
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path

from _common import arguments, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "flop_count", repeats=3, threads="evaluations")
    args, cfg = parse(parser, argv)
    data = evaluation_split(cfg, path("data", "out", cfg.name))
    model = load_detr(path("model", "out", cfg.name))
    seconds: dict[str, list[float]] = {"no_count": [], "every_batch": [], "per_input_shape": []}
    counts = {}
    for _ in range(args.repeats):
        for variant in seconds:
            flops = FlopCount()
            if variant == "per_input_shape":
                around = lambda batch: flops.forward(batch["pixel_values"])  # noqa: E731
            else:
                around = None
            start = time.perf_counter()
            with flops if variant == "every_batch" else nullcontext():
                detect(model, data.processor, data.loader, total=len(data.loader), around_forward=around)
            seconds[variant].append(time.perf_counter() - start)
            counts[variant] = flops.module_flops
    if counts["every_batch"] != counts["per_input_shape"]:
        print("error: counting per input shape gave other FLOPs than counting every batch", file=sys.stderr)
        return 1
    medians = {variant: statistics.median(s) for variant, s in seconds.items()}
    result = {"benchmark": "flop_count", "study": cfg.name, "images": data.images, "batches": len(data.loader),
              "threads": args.threads, "repeats": args.repeats, "seconds": seconds, "median_seconds": medians,
              "counting_seconds": {v: medians[v] - medians["no_count"] for v in ("every_batch", "per_input_shape")},
              "same_counts": True, "total_flops": counts["per_input_shape"]["Global"]}
    return report(result, args.out, cfg.name,
                  f"detecting {data.images} images: {medians['no_count']:.2f} s without counting, "
                  f"{medians['every_batch']:.2f} s counting every batch, {medians['per_input_shape']:.2f} s counting "
                  f"each input shape twice (same counts)")


if __name__ == "__main__":
    sys.exit(main())
