"""The sparse kernel's tile: `kernel_tile` (one tile per thread, of at most KERNEL_MAX_TILE tokens) against the rules
before it, tiles of at most 256 tokens and a fixed 16 tokens per tile, on identical masks in one run (goal: faster
where groups open rarely, nowhere slower).

DETR-R50's FFN blocks as the benchmark stage builds them (`execution.benchmark.r50_blocks`: d 256, H 2048, six
blocks of 850 encoder tokens and six of 100 queries, random seeded weights, masks sampled from the study's trained
gates of `benchmark.objective`, one gate set per target of `mgs.targets`). Per block kind, target and thread count:
dense fc1/fc2, the kernel at 16 tokens per tile, at tiles of at most 256 and at `kernel_tile`, each over the six
blocks, interleaved (order rotated every repeat) after a warm-up; medians. The gate is left out of the timing (the
same work for every tiling), so the FLOPs bound here is dense MACs / kept MACs; `fraction` is the speed-up over that
bound. Rows where two rules give the same tile (R50's 100 queries) time the same code twice: their ratio is the
run's noise, summarised apart.

    python benchmarks/kernel_tile.py                  # writes results/<study>/benchmark/kernel_tile.json
    python benchmarks/kernel_tile.py --repeats 21 --thread-counts 2
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from detr_sparsity.execution import benchmark as speed
from detr_sparsity.execution.gated_ffn import kernel_tile, sparse_ffn

from _common import flops_bound, kernel_arguments, kernel_study_inputs, parse, r50_trained_masks, report

FIXED_TILE = 16  # tokens per tile before tiles were sized to the block
PREVIOUS_MAX_TILE = 256  # kernel_tile's largest tile before one tile per thread
PREVIOUS = f"max{PREVIOUS_MAX_TILE}"  # the rule kernel_tile is compared against


def spread(ratios: list[float]) -> dict:
    return {"rows": len(ratios), "min": min(ratios), "max": max(ratios)} if ratios else {"rows": 0}


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(kernel_arguments(__doc__, "kernel_tile"), argv)
    found = kernel_study_inputs(cfg)
    if found is None:
        return 2
    gate_files, thresholds, inputs = found
    load_start = list(os.getloadavg())
    rows = []
    for kind, tokens, target, blocks, packed, masks in r50_trained_masks(cfg, gate_files, thresholds, inputs):
        def sparse(tile_of: Callable[[int], int]) -> Callable[[], list[torch.Tensor]]:
            """The six blocks through the kernel, each with `tile_of(its tokens)` tokens per tile."""
            return lambda: [sparse_ffn(b.tokens, masks[b.name], packed[b.name], tile=tile_of(b.tokens.shape[0]))
                            for b in blocks]

        tilings = {f"tile{FIXED_TILE}": lambda n, threads: FIXED_TILE,
                   PREVIOUS: lambda n, threads: kernel_tile(n, threads, PREVIOUS_MAX_TILE),
                   "kernel_tile": kernel_tile}
        variants = {"dense": lambda: [speed.dense_ffn(b) for b in blocks],
                    **{name: sparse(lambda n, of=of: of(n, torch.get_num_threads()))
                       for name, of in tilings.items()}}
        with torch.no_grad():
            # every tile computes the same bits (each token's sums in the same order)
            outputs = [variants[name]() for name in tilings]
            assert all(torch.equal(a, b) for other in outputs[1:] for a, b in zip(outputs[0], other))
            induced, bound = flops_bound(blocks, masks)
            for threads in args.thread_counts:
                torch.set_num_threads(threads)
                ms = speed.medians_ms(variants, args.repeats, args.warmup)
                row = {"kind": kind, "target": target, "tokens_per_block": tokens, "threads": threads,
                       "induced_sparsity": induced, "flops_bound": bound,
                       "tile": {name: of(tokens, threads) for name, of in tilings.items()},
                       "ms": ms, "load_average_1min": os.getloadavg()[0],
                       "speedup": {n: ms["dense"] / ms[n] for n in ms if n != "dense"},
                       "kernel_tile_over_previous": ms[PREVIOUS] / ms["kernel_tile"]}
                row["fraction"] = {n: s / bound for n, s in row["speedup"].items()}
                rows.append(row)
                print(f"{kind} target {target} ({row['induced_sparsity']:.3f}) {threads} thread(s): dense "
                      f"{ms['dense']:.2f} ms, " + ", ".join(f"{name} ({row['tile'][name]}) {ms[name]:.2f} ms"
                                                           for name in tilings)
                      + f": {row['kernel_tile_over_previous']:.2f}x over {PREVIOUS}; of the bound {bound:.2f}x: "
                      f"{row['fraction'][PREVIOUS]:.2f} -> {row['fraction']['kernel_tile']:.2f}", flush=True)
    # Where both rules give the same tile the two variants run the same code: their ratio is the run's noise.
    differ = [r["kernel_tile_over_previous"] for r in rows if r["tile"][PREVIOUS] != r["tile"]["kernel_tile"]]
    same = [r["kernel_tile_over_previous"] for r in rows if r["tile"][PREVIOUS] == r["tile"]["kernel_tile"]]
    result = {"benchmark": "kernel_tile", "study": cfg.name, "objective": cfg.benchmark["objective"],
              "repeats": args.repeats, "warmup": args.warmup, "previous": PREVIOUS,
              "load_average": {"start": load_start, "end": list(os.getloadavg())}, "rows": rows,
              "kernel_tile_over_previous": {"tiles_differ": spread(differ), "same_tile": spread(same)}}
    summary = result["kernel_tile_over_previous"]
    return report(result, args.out, cfg.name,
                  f"kernel_tile against tiles of at most {PREVIOUS_MAX_TILE}: "
                  + "; ".join(f"{k.replace('_', ' ')}: {v['min']:.2f}x to {v['max']:.2f}x over {v['rows']} rows"
                              for k, v in summary.items() if v["rows"]))


if __name__ == "__main__":
    sys.exit(main())
