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

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from detr_sparsity.atomic import write_json
from detr_sparsity.config import load_config
from detr_sparsity.machine import environment
from detr_sparsity.pipeline import path
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import sparse_ffns
from detr_sparsity.sparsity.profile import profile_activations


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pipeline jobs run with 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<study>/benchmark/profiling_overhead.json")
    args = parser.parse_args(argv)

    cfg = load_config(args.params)
    torch.set_num_threads(args.threads)
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
        **environment(),
    }
    out = args.out or path("benchmark", "out", cfg.name).parent / "profiling_overhead.json"
    write_json(out, result)
    print(f"profiled / plain = {result['overhead_ratio']['profiled_vs_plain']:.3f}, "
          f"wrapped / plain = {result['overhead_ratio']['wrapped_vs_plain']:.3f} "
          f"(medians {median['plain']:.2f} s, {median['wrapped']:.2f} s, {median['profiled']:.2f} s; {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
