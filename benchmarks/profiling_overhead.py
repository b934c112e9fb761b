"""What profiling adds to a plain evaluation pass over the same images (goal: at most 30 % more time).

Three passes over the same pre-collated batches of the profile split, measured side by side and
interleaved, several times, after a warm-up; medians reported:
- plain:     the unwrapped dense model;
- wrapped:   FFN wrappers with the dense policy (what every evaluation counts);
- profiled:  wrappers plus the streaming activation profile (what stage `profile` runs).
Data loading is left out of all three, so the ratio is the model-side overhead (a stricter figure than
with JPEG decoding and resizing included).

    python benchmarks/profiling_overhead.py                   # default study, results/<study>/...
    python benchmarks/profiling_overhead.py --threads 2 --repeats 7
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from detr_sparsity.pipeline import path
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import sparse_ffns
from detr_sparsity.sparsity.profile import profile_activations

from _common import arguments, parse, report


@torch.no_grad()
def plain_pass(model, batches) -> None:
    for batch in batches:
        model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])


@torch.no_grad()
def wrapped_pass(model, batches) -> None:
    with sparse_ffns(model):
        plain_pass(model, batches)


def profiled_pass(model, batches) -> None:
    profile_activations(model, batches)


PASSES = {"plain": plain_pass, "wrapped": wrapped_pass, "profiled": profiled_pass}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "profiling_overhead", repeats=5, threads="pipeline jobs")
    args, cfg = parse(parser, argv)
    model_dir, data_dir = path("model", "out", cfg.name), path("data", "out", cfg.name)
    if not (model_dir / "config.json").is_file():
        print(f"error: no model at {model_dir}; run the pipeline first (snakemake --cores 8)", file=sys.stderr)
        return 2
    data = evaluation_split(cfg, data_dir, cfg.profile["split"])
    batches = list(data.loader)
    model = load_detr(model_dir)

    for run_pass in PASSES.values():  # warm-up
        run_pass(model, batches[:2])
    seconds: dict[str, list[float]] = {name: [] for name in PASSES}
    for repeat in range(args.repeats):
        # Alternate the order, so drift in machine speed does not favour one pass.
        order = list(PASSES) if repeat % 2 == 0 else list(reversed(PASSES))
        for name in order:
            start = time.perf_counter()
            PASSES[name](model, batches)
            seconds[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "benchmark": "profiling_overhead",
        "study": cfg.name,
        "split": cfg.profile["split"],
        "images": data.images,
        "batch_size": cfg.evaluate["batch_size"],
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "overhead_ratio": {"profiled_vs_plain": median["profiled"] / median["plain"],
                           "wrapped_vs_plain": median["wrapped"] / median["plain"]},
        "goal": "profiled_vs_plain <= 1.30",
    }
    ratio = result["overhead_ratio"]
    return report(result, args.out, cfg.name, f"profiled / plain = {ratio['profiled_vs_plain']:.3f}, "
                  f"wrapped / plain = {ratio['wrapped_vs_plain']:.3f}, "
                  f"medians {median['plain']:.2f} s, {median['wrapped']:.2f} s, {median['profiled']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
