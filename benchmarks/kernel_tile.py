"""The sparse kernel's tile: `kernel_tile` (tiles sized to the tokens and threads) against the fixed 16 tokens per
tile it replaced, on identical masks in one run (goal: faster where groups open rarely, nowhere slower).

DETR-R50's FFN blocks as the benchmark stage builds them (`execution.benchmark.r50_blocks`: d 256, H 2048, six
blocks of 850 encoder tokens and six of 100 queries, random seeded weights, masks sampled from the study's trained
gates of `benchmark.objective`, one gate set per target of `mgs.targets`). Per block kind, target and thread count:
dense fc1/fc2, the kernel at 16 tokens per tile and at `kernel_tile`, each over the six blocks, interleaved (order
rotated every repeat) after a warm-up; medians. The gate is left out of the timing (the same work for both), so
the FLOPs bound here is dense MACs / kept MACs; `fraction` is the speed-up over that bound.

    python benchmarks/kernel_tile.py                  # writes results/<study>/benchmark/kernel_tile.json
    python benchmarks/kernel_tile.py --repeats 21 --thread-counts 2
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from detr_sparsity.execution import benchmark as speed
from detr_sparsity.execution.gated_ffn import PackedFFN, kernel_tile, sparse_ffn

from _common import kernel_arguments, kernel_study_inputs, parse, report

PREVIOUS_TILE = 16  # tokens per tile before kernel_tile


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(kernel_arguments(__doc__, "kernel_tile"), argv)
    found = kernel_study_inputs(cfg)
    if found is None:
        return 2
    gate_files, thresholds, inputs = found
    tokens = {"encoder": speed.R50["encoder_tokens"], "decoder": speed.R50["queries"]}
    load_start = list(os.getloadavg())
    rows = []
    for kind in speed.KINDS:
        blocks = [b for b in speed.r50_blocks(kind, tokens[kind], speed.study_blocks(inputs, kind), list(gate_files),
                                              thresholds, cfg.seed) if b.gates]
        if not blocks:  # `mgs.blocks` gates no block of this kind
            continue
        packed = {b.name: PackedFFN(b.fc1, b.fc2, b.group_size) for b in blocks}
        for target in gate_files:
            masks = {b.name: b.open_groups[target].contiguous() for b in blocks}

            def sparse(tile_of: Callable[[int], int]) -> Callable[[], list[torch.Tensor]]:
                """The six blocks through the kernel, each with `tile_of(its tokens)` tokens per tile."""
                return lambda: [sparse_ffn(b.tokens, masks[b.name], packed[b.name], tile=tile_of(b.tokens.shape[0]))
                                for b in blocks]

            variants = {"dense": lambda: [speed.dense_ffn(b) for b in blocks],
                        f"tile{PREVIOUS_TILE}": sparse(lambda n: PREVIOUS_TILE),
                        "kernel_tile": sparse(lambda n: kernel_tile(n, torch.get_num_threads()))}
            with torch.no_grad():
                # every tile computes the same bits (each token's sums in the same order)
                assert all(torch.equal(a, b) for a, b in zip(variants[f"tile{PREVIOUS_TILE}"](),
                                                             variants["kernel_tile"]()))
                kept = sum(int(masks[b.name].sum()) * b.group_size for b in blocks)
                positions = sum(b.tokens.shape[0] * b.fc1.out_features for b in blocks)
                bound = positions / kept
                for threads in args.thread_counts:
                    torch.set_num_threads(threads)
                    ms = speed.medians_ms(variants, args.repeats, args.warmup)
                    row = {"kind": kind, "target": target, "tokens_per_block": tokens[kind], "threads": threads,
                           "induced_sparsity": 1 - kept / positions, "flops_bound": bound,
                           "tile": {f"tile{PREVIOUS_TILE}": PREVIOUS_TILE,
                                    "kernel_tile": kernel_tile(tokens[kind], threads)},
                           "ms": ms, "load_average_1min": os.getloadavg()[0],
                           "speedup": {n: ms["dense"] / ms[n] for n in ms if n != "dense"},
                           "kernel_tile_over_previous": ms[f"tile{PREVIOUS_TILE}"] / ms["kernel_tile"]}
                    row["fraction"] = {n: s / bound for n, s in row["speedup"].items()}
                    rows.append(row)
                    print(f"{kind} target {target} ({row['induced_sparsity']:.3f}) {threads} thread(s): dense "
                          f"{ms['dense']:.2f} ms, tile {PREVIOUS_TILE} {ms[f'tile{PREVIOUS_TILE}']:.2f} ms, "
                          f"kernel_tile ({row['tile']['kernel_tile']}) {ms['kernel_tile']:.2f} ms: "
                          f"{row['kernel_tile_over_previous']:.2f}x; of the bound {bound:.2f}x: "
                          f"{row['fraction'][f'tile{PREVIOUS_TILE}']:.2f} -> {row['fraction']['kernel_tile']:.2f}",
                          flush=True)
    ratios = [r["kernel_tile_over_previous"] for r in rows]
    result = {"benchmark": "kernel_tile", "study": cfg.name, "objective": cfg.benchmark["objective"],
              "repeats": args.repeats, "warmup": args.warmup, "previous_tile": PREVIOUS_TILE,
              "load_average": {"start": load_start, "end": list(os.getloadavg())}, "rows": rows,
              "kernel_tile_over_previous": {"min": min(ratios), "max": max(ratios)}}
    return report(result, args.out, cfg.name,
                  f"kernel_tile against {PREVIOUS_TILE}-token tiles: {min(ratios):.2f}x to {max(ratios):.2f}x "
                  f"over {len(rows)} rows")


if __name__ == "__main__":
    sys.exit(main())
