"""What the FFN wrapper's counting costs: each block's nonzero values per token by `nonzero_per_token` (what the
wrapper counts with) against `torch.count_nonzero` (what it counted with before), in the pipeline's own dense
evaluation of the study's split and in its own gate training (distillation, from the layer-local gates), on the
study's dense model and front-end cache. Gate training no longer counts (`benchmarks/gate_training_counting.py`): here
its wrappers are made to count, as they did when this was measured.

The two variants alternate, `--repeats` times each, in one process; the evaluation's rows (every count and AP) and
the trained gates must be equal between them.

    python benchmarks/ffn_counting.py --repeats 3 --steps 100

Needs the study's model, mgs_cache and mgs_local stages. Writes results/<study>/benchmark/ffn_counting.json (or
--out).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.mgs import training
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import load_gates
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity import ffn

from _common import arguments, counting_sparse_ffns, parse, report

COUNTERS = {"count_nonzero": lambda values: torch.count_nonzero(values, dim=-1),
            "nonzero_per_token": ffn.nonzero_per_token}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "ffn_counting", repeats=3, threads="evaluations and gate trainings")
    parser.add_argument("--steps", type=int, default=100, help="gate-training steps per run")
    args, cfg = parse(parser, argv)
    data = evaluation_split(cfg, path("data", "out", cfg.name))
    model = load_detr(path("model", "out", cfg.name))
    cache = FrontEndCache.load(path("mgs_cache", "out", cfg.name))
    local = path("mgs_local", "gates", cfg.name)
    settings = GateTraining.from_budget(cfg.gate_training["training"], cfg.mgs["targets"][-1], "distillation",
                                        steps=args.steps, checkpoint_every=args.steps + 1)
    seconds = {job: {name: [] for name in COUNTERS} for job in ("evaluation", "gate_training")}
    rows, gates = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            for name, counter in COUNTERS.items():
                ffn.nonzero_per_token = counter  # the wrapper looks it up at every call
                try:
                    start = time.perf_counter()
                    row = evaluate_policies(model, data, {}, Path(scratch) / "detections.json")
                    seconds["evaluation"][name].append(time.perf_counter() - start)
                    trained = load_gates(local)
                    training.sparse_ffns = counting_sparse_ffns
                    start = time.perf_counter()
                    train_gates(model, trained, cache, settings, cfg.seed)
                    seconds["gate_training"][name].append(time.perf_counter() - start)
                finally:
                    ffn.nonzero_per_token = COUNTERS["nonzero_per_token"]
                    training.sparse_ffns = ffn.sparse_ffns
                rows[name] = row
                gates[name] = {block: gate.state_dict() for block, gate in trained.items()}
    same_gates = all(torch.equal(gates["count_nonzero"][b][k], gates["nonzero_per_token"][b][k])
                     for b in gates["count_nonzero"] for k in gates["count_nonzero"][b])
    if rows["count_nonzero"] != rows["nonzero_per_token"] or not same_gates:
        print("error: the two ways of counting gave other rows or other gates", file=sys.stderr)
        return 1
    medians = {job: {name: statistics.median(s) for name, s in by.items()} for job, by in seconds.items()}
    speedup = {job: m["count_nonzero"] / m["nonzero_per_token"] for job, m in medians.items()}
    result = {"benchmark": "ffn_counting", "study": cfg.name, "images": data.images, "gate_training_steps": args.steps,
              "gate_training_target": settings.target, "threads": args.threads, "repeats": args.repeats,
              "seconds": seconds, "median_seconds": medians, "speedup": speedup, "same_rows_and_gates": True}
    e, g = medians["evaluation"], medians["gate_training"]
    return report(result, args.out, cfg.name,
                  f"dense evaluation of {data.images} images: {e['count_nonzero']:.2f} s counting with count_nonzero, "
                  f"{e['nonzero_per_token']:.2f} s with nonzero_per_token ({speedup['evaluation']:.2f}x); "
                  f"{args.steps} gate-training steps: {g['count_nonzero']:.1f} s against {g['nonzero_per_token']:.1f} s "
                  f"({speedup['gate_training']:.2f}x); same rows and gates")


if __name__ == "__main__":
    sys.exit(main())
