"""What counting costs in gate training: the pipeline's own distillation gate training (from the layer-local gates,
on the study's dense model and front-end cache) with its FFN wrappers counting every block's nonzero activations
on every step, as it did before, against not counting (`sparse_ffns(..., counting=False)`, what it does now: no
step reads the counts).

The two variants alternate, `--repeats` times each, in one process; the trained gates must be equal between them.

    python benchmarks/gate_training_counting.py --repeats 3 --steps 100

Needs the study's model, mgs_cache and mgs_local stages. Writes results/<study>/benchmark/gate_training_counting.json
(or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from detr_sparsity.mgs import training
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import load_gates
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.ffn import sparse_ffns

from _common import arguments, counting_sparse_ffns, parse, report

# train_gates looks sparse_ffns up in its module at every call: each variant puts its own there.
VARIANTS = {"counting": counting_sparse_ffns, "not_counting": sparse_ffns}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "gate_training_counting", repeats=3, threads="gate trainings")
    parser.add_argument("--steps", type=int, default=100, help="gate-training steps per run")
    args, cfg = parse(parser, argv)
    model = load_detr(path("model", "out", cfg.name))
    cache = FrontEndCache.load(path("mgs_cache", "out", cfg.name))
    local = path("mgs_local", "gates", cfg.name)
    settings = GateTraining.from_budget(cfg.gate_training["training"], cfg.mgs["targets"][-1], "distillation",
                                        steps=args.steps, checkpoint_every=args.steps + 1)
    seconds = {name: [] for name in VARIANTS}
    gates = {}
    for _ in range(args.repeats):
        for name, wrap in VARIANTS.items():
            training.sparse_ffns = wrap
            try:
                trained = load_gates(local)
                start = time.perf_counter()
                train_gates(model, trained, cache, settings, cfg.seed)
                seconds[name].append(time.perf_counter() - start)
            finally:
                training.sparse_ffns = sparse_ffns
            gates[name] = {block: gate.state_dict() for block, gate in trained.items()}
    same_gates = all(torch.equal(gates["counting"][b][k], gates["not_counting"][b][k])
                     for b in gates["counting"] for k in gates["counting"][b])
    if not same_gates:
        print("error: training with and without counting gave other gates", file=sys.stderr)
        return 1
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    speedup = medians["counting"] / medians["not_counting"]
    result = {"benchmark": "gate_training_counting", "study": cfg.name, "objective": settings.objective,
              "steps": args.steps, "target": settings.target, "threads": args.threads, "repeats": args.repeats,
              "seconds": seconds, "median_seconds": medians, "speedup": speedup, "same_gates": True}
    return report(result, args.out, cfg.name,
                  f"{args.steps} distillation gate-training steps: {medians['counting']:.1f} s counting, "
                  f"{medians['not_counting']:.1f} s not counting ({speedup:.2f}x); same gates")


if __name__ == "__main__":
    sys.exit(main())
