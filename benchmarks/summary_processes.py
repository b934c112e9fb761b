"""What the summary stage's comparisons cost, their detection files matched and resampled one at a time against
`--processes` at a time (what the stage does with every core of its job), on the study's own rows: the same
comparisons.json content asserted. The two alternate, `--repeats` times each, in one process.

    python benchmarks/summary_processes.py                # default study, after `make study`
    python benchmarks/summary_processes.py --processes 2 --repeats 2
"""

from __future__ import annotations

import statistics
import sys
import time

from detr_sparsity.pipeline import gathered
from detr_sparsity.reporting.comparisons import comparisons
from detr_sparsity.reporting.summary import read_rows

from _common import arguments, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "summary_processes", repeats=2)
    parser.add_argument("--processes", type=int, default=2)
    args, cfg = parse(parser, argv)
    rows = read_rows(gathered(cfg, "summary", "rows"))
    bootstrap = cfg.raw["bootstrap"]
    seconds = {1: [], args.processes: []}
    found = {}
    for _ in range(args.repeats):
        for processes in seconds:
            start = time.perf_counter()
            found[processes] = comparisons(rows, bootstrap["resamples"], cfg.seed, bootstrap["level"], processes)
            seconds[processes].append(time.perf_counter() - start)
    if found[1] != found[args.processes]:
        print(f"error: {args.processes} processes gave other comparisons than one", file=sys.stderr)
        return 1
    medians = {str(p): statistics.median(s) for p, s in seconds.items()}
    speedup = medians["1"] / medians[str(args.processes)]
    result = {"benchmark": "summary_processes", "study": cfg.name, "rows": len(rows),
              "comparisons": len(found[1]["comparisons"]), "detection_files": len(found[1]["detections"]),
              "resamples": bootstrap["resamples"], "repeats": args.repeats,
              "seconds": {str(p): s for p, s in seconds.items()}, "median_seconds": medians, "speedup": speedup,
              "same_comparisons": True}
    return report(result, args.out, cfg.name,
                  f"{result['comparisons']} comparisons over {result['detection_files']} detection files: "
                  f"{medians['1']:.1f} s one file at a time, {medians[str(args.processes)]:.1f} s {args.processes} at "
                  f"a time ({speedup:.2f}x); the same comparisons")


if __name__ == "__main__":
    sys.exit(main())
