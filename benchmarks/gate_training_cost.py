"""What one MGS gate set costs to train: the paper's group_activity objective (layer-local, from the cached block
inputs, stage `mgs_local`) against the distillation objective (end to end through the frozen DETR from the cached
front end, stage `mgs_train`), in one run on one machine, interleaved, medians reported.

group_activity trains once per study, for every target; distillation trains once per target. Both arms run the
pipeline's own training functions with the study's settings on the study's cached outputs. The layer-local
training runs its configured steps; the end-to-end one runs `--end-to-end-steps` steps (a full training takes
minutes per repeat), and its full cost is that time scaled to the configured steps (said so in the JSON).

    python benchmarks/gate_training_cost.py                 # default study, after `make study`
    python benchmarks/gate_training_cost.py --repeats 3 --end-to-end-steps 200 --threads 1
"""

from __future__ import annotations

import statistics
import sys
import time

from detr_sparsity.mgs.block_inputs import BlockInputs
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import gated_block_names, make_gates
from detr_sparsity.mgs.group_activity import LocalTraining, train_group_activity
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "gate_training_cost", repeats=3, threads="gate-training jobs")
    parser.add_argument("--end-to-end-steps", type=int, default=200, help="distillation steps timed per repeat")
    parser.add_argument("--target", type=float, default=0.9)
    args, cfg = parse(parser, argv)
    model_dir = path("model", "out", cfg.name)
    cache_path, inputs_path = path("mgs_cache", "out", cfg.name), path("mgs_cache", "block_inputs", cfg.name)
    if not (model_dir / "config.json").is_file() or not cache_path.is_file() or not inputs_path.is_file():
        print(f"error: no model at {model_dir} or no caches at {cache_path.parent}; run the pipeline first "
              "(make study)", file=sys.stderr)
        return 2
    model = load_detr(model_dir)
    blocks = ffn_blocks(model)
    names = gated_block_names(cfg.mgs["blocks"], blocks)
    front_end, block_inputs = FrontEndCache.load(cache_path), BlockInputs.load(inputs_path)
    local = LocalTraining(**cfg.gate_training["local"])
    end_to_end = GateTraining.from_budget(cfg.gate_training["training"], args.target, "distillation",
                                          steps=args.end_to_end_steps, checkpoint_every=args.end_to_end_steps)

    def fresh():
        return make_gates(blocks, names, cfg.mgs["group_size"], cfg.mgs["gate_threshold"])

    def layer_local() -> float:
        start = time.perf_counter()
        train_group_activity(fresh(), {n: blocks[n].fc1 for n in names}, {n: block_inputs.inputs[n] for n in names},
                             {n: block_inputs.images[n] for n in names}, local, cfg.seed)
        return time.perf_counter() - start

    def distillation() -> float:
        start = time.perf_counter()
        train_gates(model, fresh(), front_end, end_to_end, seed=cfg.seed)
        return time.perf_counter() - start

    arms = {"group_activity": layer_local, "distillation": distillation}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        # Alternate the order, so drift in machine speed does not favour one arm.
        for name in (list(arms) if repeat % 2 == 0 else list(reversed(arms))):
            seconds[name].append(arms[name]())
    median = {name: statistics.median(values) for name, values in seconds.items()}
    configured_steps = cfg.gate_training["training"]["steps"]
    distillation_full = median["distillation"] / args.end_to_end_steps * configured_steps
    targets = len(cfg.mgs["targets"])
    result = {
        "benchmark": "gate_training_cost",
        "study": cfg.name,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "group_activity": {"steps": local.steps, "batch_tokens": local.batch_tokens, "blocks": len(names),
                           "seconds_per_gate_set": median["group_activity"]},
        "distillation": {"steps_timed": args.end_to_end_steps, "steps_configured": configured_steps,
                         "batch_size": end_to_end.batch_size,
                         "seconds_per_step": median["distillation"] / args.end_to_end_steps,
                         # scaled from the timed steps: a full training's cost at the configured steps
                         "seconds_per_gate_set": distillation_full},
        "ratio_per_gate_set": distillation_full / median["group_activity"],
        # group_activity trains once for every target; distillation once per target
        "ratio_per_study": targets * distillation_full / median["group_activity"],
        "targets": targets,
    }
    return report(result, args.out, cfg.name, f"one gate set: group_activity {median['group_activity']:.1f} s, "
                  f"distillation {distillation_full:.1f} s (scaled from {args.end_to_end_steps} steps): "
                  f"{result['ratio_per_gate_set']:.1f}x per gate set, "
                  f"{result['ratio_per_study']:.1f}x per study of {targets} targets")


if __name__ == "__main__":
    sys.exit(main())
