"""The sparse kernel built for each instruction set this CPU runs (`cpu_kernel.instruction_sets`: the native build,
and on a CPU with AVX-512 also the AVX2 build, the code path of the project's other machine class), on identical
masks in one run: how close each comes to its FLOPs bound here.

DETR-R50's FFN blocks as the benchmark stage builds them (`execution.benchmark.r50_blocks`: d 256, H 2048, six
blocks of 850 encoder tokens and six of 100 queries, random seeded weights, masks sampled from the study's trained
gates of `benchmark.objective`, one gate set per target of `mgs.targets`). Per block kind, target and thread count:
dense fc1/fc2 and each build, called the same way with the same tile (`kernel_tile`), each over the six blocks,
interleaved (order rotated every repeat) after a warm-up; medians. The gate is left out of the timing, so the FLOPs
bound is dense MACs / kept MACs; `fraction` is the speed-up over that bound. The AVX2 build on an AVX-512 CPU runs
on that CPU's cores: it says what the AVX2 code path gives on this machine, not what the AVX2 class measures.

    python benchmarks/kernel_isa.py                  # writes results/<study>/benchmark/kernel_isa.json
    python benchmarks/kernel_isa.py --repeats 21 --thread-counts 2
"""

from __future__ import annotations

import os
import sys

import torch

from detr_sparsity.execution import benchmark as speed
from detr_sparsity.execution.cpu_kernel import cpu_kernel, extension_name, instruction_sets
from detr_sparsity.execution.gated_ffn import kernel_tile

from _common import (flops_bound, kernel_arguments, kernel_direct, kernel_study_inputs, parse, r50_trained_masks,
                     report)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(kernel_arguments(__doc__, "kernel_isa"), argv)
    found = kernel_study_inputs(cfg)
    if found is None:
        return 2
    gate_files, thresholds, inputs = found
    builds = {isa: cpu_kernel(isa) for isa in instruction_sets()}
    missing = [isa for isa, kernel in builds.items() if kernel is None]
    if missing:
        print(f"error: the {', '.join(missing)} build could not be made here (see the log above)", file=sys.stderr)
        return 2
    load_start = list(os.getloadavg())
    rows = []
    for kind, tokens, target, blocks, packed, masks in r50_trained_masks(cfg, gate_files, thresholds, inputs):
        variants = {"dense": lambda: [speed.dense_ffn(b) for b in blocks],
                    **{isa: kernel_direct(kernel, blocks, masks, packed) for isa, kernel in builds.items()}}
        with torch.no_grad():
            # the same function: the vector widths differ, so the sums run in another order
            outputs = {isa: variants[isa]() for isa in builds}
            for isa in builds:
                for a, b in zip(outputs["native"], outputs[isa]):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            induced, bound = flops_bound(blocks, masks)
            for threads in args.thread_counts:
                torch.set_num_threads(threads)
                ms = speed.medians_ms(variants, args.repeats, args.warmup)
                speedup = {isa: ms["dense"] / ms[isa] for isa in builds}
                row = {"kind": kind, "target": target, "tokens_per_block": tokens, "threads": threads,
                       "induced_sparsity": induced, "flops_bound": bound,
                       "tile": kernel_tile(tokens, threads), "ms": ms, "speedup": speedup,
                       "fraction": {isa: s / bound for isa, s in speedup.items()},
                       "load_average_1min": os.getloadavg()[0]}
                rows.append(row)
                print(f"{kind} target {target} ({row['induced_sparsity']:.3f}) {threads} thread(s): dense "
                      f"{ms['dense']:.2f} ms, " + ", ".join(
                          f"{isa} {ms[isa]:.2f} ms ({speedup[isa]:.2f}x, {row['fraction'][isa]:.2f} of "
                          f"{bound:.2f}x)" for isa in builds), flush=True)
    result = {"benchmark": "kernel_isa", "study": cfg.name, "objective": cfg.benchmark["objective"],
              "repeats": args.repeats, "warmup": args.warmup,
              "builds": {isa: extension_name(isa) for isa in builds},
              "load_average": {"start": load_start, "end": list(os.getloadavg())}, "rows": rows}
    r50 = [r for r in rows if r["kind"] == "encoder" and r["target"] == "0.9"]
    return report(result, args.out, cfg.name,
                  "R50 encoder at 0.9: " + "; ".join(
                      f"{r['threads']} thread(s) " + ", ".join(f"{isa} {r['speedup'][isa]:.2f}x" for isa in builds)
                      for r in r50) if r50 else f"{len(rows)} rows")


if __name__ == "__main__":
    sys.exit(main())
