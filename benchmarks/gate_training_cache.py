"""Gate-training throughput with the cached front end against recomputing it at every step.

Both arms run the pipeline's `train_gates` with the study's first end-to-end objective and its batch size, on the same training
images, from fresh gates, interleaved, several times; medians reported:
- cached:    what stage `mgs_train` does: the backbone's projected features and the dense model's outputs
             are read from the `mgs_cache` file;
- recomputed: every step loads and preprocesses its images from disk and runs the frozen backbone and input
             projection (and the dense model, which the distillation objective learns from) again.

    python benchmarks/gate_training_cache.py                 # default study, results/<study>/...
    python benchmarks/gate_training_cache.py --steps 40 --repeats 5 --threads 1
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

from detr_sparsity.pipeline import path
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.mgs.gates import make_gates
from detr_sparsity.mgs.objectives import OBJECTIVES
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, parse, report


class RecomputedFrontEnd:
    """Stands in for the cache: each batch is loaded, preprocessed and run through a dense copy of the model."""

    def __init__(self, dataset: CocoDetection, collate: DetrCollate, dense_model, images: int) -> None:
        self.dataset, self.collate, self.dense, self.images = dataset, collate, dense_model, images

    def __len__(self) -> int:
        return self.images

    def batch(self, index: list[int]) -> dict:
        pixels = self.collate([self.dataset[i] for i in index])
        return build_front_end_cache(self.dense, [pixels]).batch(list(range(len(index))))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "gate_training_cache", repeats=5, threads="mgs_train jobs")
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--target", type=float, default=0.9)
    args, cfg = parse(parser, argv)
    model_dir, data_dir = path("model", "out", cfg.name), path("data", "out", cfg.name)
    cache_path = path("mgs_cache", "out", cfg.name)
    if not (model_dir / "config.json").is_file() or not cache_path.is_file():
        print(f"error: no model at {model_dir} or no cache at {cache_path}; run the pipeline first "
              "(snakemake --cores 8)", file=sys.stderr)
        return 2
    model = load_detr(model_dir)
    cached = FrontEndCache.load(cache_path)
    dataset = CocoDetection(load_split(data_dir, cfg.gate_training["cache"]["split"]))
    collate = DetrCollate(image_processor(cfg.input), with_labels=True)
    recomputed = RecomputedFrontEnd(dataset, collate, copy.deepcopy(model).eval(), len(cached))
    sources = {"cached": cached, "recomputed": recomputed}
    # The first end-to-end objective (group_activity trains layer-locally: no front end at all).
    objective = next((o for o in cfg.mgs["objectives"] if o in OBJECTIVES), "distillation")
    settings = GateTraining.from_budget(cfg.gate_training["training"], args.target, objective, steps=args.steps,
                                        checkpoint_every=args.steps)

    def measure(source) -> float:
        gates = make_gates(ffn_blocks(model), list(ffn_blocks(model)), cfg.mgs["group_size"], cfg.mgs["gate_threshold"])
        start = time.perf_counter()
        train_gates(model, gates, source, settings, seed=cfg.seed)
        return time.perf_counter() - start

    for source in sources.values():  # warm-up
        train_gates(model, make_gates(ffn_blocks(model), list(ffn_blocks(model)), cfg.mgs["group_size"], 0.5),
                    source, GateTraining(target=args.target, objective=settings.objective, steps=2,
                                         batch_size=settings.batch_size), seed=cfg.seed)
    seconds: dict[str, list[float]] = {name: [] for name in sources}
    for repeat in range(args.repeats):
        # Alternate the order, so drift in machine speed does not favour one arm.
        for name in (list(sources) if repeat % 2 == 0 else list(reversed(sources))):
            seconds[name].append(measure(sources[name]))

    median = {name: statistics.median(values) for name, values in seconds.items()}
    steps_per_second = {name: args.steps / value for name, value in median.items()}
    result = {
        "benchmark": "gate_training_cache",
        "study": cfg.name,
        "objective": settings.objective,
        "batch_size": settings.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "steps_per_second": steps_per_second,
        "images_per_second": {name: v * settings.batch_size for name, v in steps_per_second.items()},
        "speedup_cached_vs_recomputed": median["recomputed"] / median["cached"],
    }
    return report(result, args.out, cfg.name, f"cached front end: {steps_per_second['cached']:.2f} steps/s, "
                  f"recomputed: {steps_per_second['recomputed']:.2f} steps/s; "
                  f"speed-up {result['speedup_cached_vs_recomputed']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
