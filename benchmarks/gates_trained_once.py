"""What an end-to-end objective's gates lose when trained once, toward one target, and only calibrated to the others
(what stage mgs_train does since 2026-12-07), against gates trained toward each target (what it did before).

Per target of `mgs.targets`, the objective's gates are trained toward it as the pipeline trains them
(`mgs.training.train_gates` with the study's budget, from the group_activity gates where `warm_start` asks for it,
the study's seed, one thread). Then, for each `--trained-at` target S, the gates trained toward S are calibrated to
every target T (the pipeline's calibration, `mgs.calibration`) and evaluated on the evaluation split as
mgs_evaluate evaluates; each row is compared with the gates trained toward T and calibrated to T: AP and AP50 with
paired bootstrap intervals over the evaluation images (the study's `bootstrap` settings). At T = S the two are the
same gates.

    python benchmarks/gates_trained_once.py --trained-at 0.95 0.9

About 2.5 minutes per target on one thread (the study's 1,000 steps), plus 12 s per row. Needs the study's data,
model, mgs_cache and mgs_local stages. Writes results/<study>/benchmark/gates_trained_once.json (or --out), the
detections in results/<study>/benchmark/gates_trained_once/.
"""

from __future__ import annotations

import copy
import sys
import time

from detr_sparsity.data.dataset import image_processor, load_split
from detr_sparsity.evaluation.bootstrap import paired_bootstrap_interval
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.mgs.allocation import calibrate
from detr_sparsity.mgs.calibration import calibration_front_end
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import gated_block_names, load_gate_set, make_gates
from detr_sparsity.mgs.objectives import OBJECTIVES
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, parse, report


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "gates_trained_once", repeats=None, threads="mgs_train and mgs_calibrate jobs")
    parser.add_argument("--objective", default="distillation", choices=OBJECTIVES)
    parser.add_argument("--trained-at", type=float, nargs="+", default=None,
                        help="targets whose gates are calibrated to every other (default: mgs.train_target)")
    args, cfg = parse(parser, argv)
    study, mgs, objective = cfg.name, cfg.mgs, args.objective
    targets = [float(t) for t in mgs["targets"]]
    trained_at = args.trained_at or [mgs["train_target"]]
    unknown = sorted(set(trained_at) - set(targets))
    if unknown:
        raise SystemExit(f"error: --trained-at {unknown} not in mgs.targets {targets}")
    budget = cfg.gate_training["training"]
    model = load_detr(path("model", "out", study))
    blocks = ffn_blocks(model)
    names = gated_block_names(mgs["blocks"], blocks)
    front_end = FrontEndCache.load(path("mgs_cache", "out", study))
    split = load_split(path("data", "out", study), cfg.profile["split"])
    held_out = calibration_front_end(model, split, image_processor(cfg.input), budget["batch_size"])
    evaluation = evaluation_split(cfg, path("data", "out", study))
    out_dir = path("benchmark", "out", study).parent / "gates_trained_once"

    trained, train_seconds = {}, {}
    for target in targets:
        gates = (load_gate_set(path("mgs_local", "gates", study), names, "mgs_local") if budget["warm_start"]
                 else make_gates(blocks, names, mgs["group_size"], mgs["gate_threshold"]))
        settings = GateTraining.from_budget(budget, target, objective)
        start = time.perf_counter()
        train_gates(model, gates, front_end, settings, cfg.seed)
        train_seconds[target] = time.perf_counter() - start
        trained[target] = gates
        print(f"trained toward {target} in {train_seconds[target]:.0f} s", flush=True)

    def measured(source: float, target: float) -> dict:
        gates = copy.deepcopy(trained[source])
        start = time.perf_counter()
        calibration = calibrate(mgs["calibration"], model, gates, held_out, list(range(len(held_out))), target,
                                budget["batch_size"])
        detections = out_dir / f"{objective}-trained-{source}-calibrated-{target}.json"
        row = evaluate_policies(model, evaluation, gates, detections)
        return {"trained_toward": source, "target": target, "calibration_offset": calibration["offset"],
                "induced_sparsity": row["induced_sparsity"]["overall"], "AP": row["AP"], "AP50": row["AP50"],
                "detections": detections, "seconds": time.perf_counter() - start}

    per_target = {target: measured(target, target) for target in targets}
    bootstrap = cfg.raw["bootstrap"]
    rows = []
    for source in trained_at:
        for target in targets:
            once = per_target[target] if target == source else measured(source, target)
            compared = paired_bootstrap_interval(evaluation.split.annotations, once["detections"],
                                                 per_target[target]["detections"], bootstrap["resamples"], cfg.seed,
                                                 bootstrap["level"])
            rows.append({**{k: v for k, v in once.items() if k != "detections"},
                         "per_target": {k: v for k, v in per_target[target].items() if k != "detections"},
                         **{k: v for k, v in compared.items()
                            if k.startswith(("AP_difference", "AP50_difference", "AP_ratio"))}})
            print(f"trained toward {source}, calibrated to {target}: AP {once['AP']:.4f} against "
                  f"{per_target[target]['AP']:.4f} trained toward {target} ({compared['AP_difference']:+.4f} "
                  f"[{compared['AP_difference_low']:+.4f}, {compared['AP_difference_high']:+.4f}])", flush=True)
    result = {"benchmark": "gates_trained_once", "objective": objective, "training": budget, "threads": args.threads,
              "calibration": mgs["calibration"], "calibration_images": len(held_out),
              "evaluation_images": evaluation.images, "bootstrap": bootstrap,
              "train_seconds": {str(t): s for t, s in train_seconds.items()}, "rows": rows}
    worst = min((r for r in rows if r["trained_toward"] != r["target"]), key=lambda r: r["AP_difference"])
    return report(result, args.out, study,
                  f"{len(rows)} rows; the largest loss {worst['AP_difference']:+.4f} AP (trained toward "
                  f"{worst['trained_toward']}, calibrated to {worst['target']})")


if __name__ == "__main__":
    sys.exit(main())
