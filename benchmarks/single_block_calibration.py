"""What the single-block protocol's calibration costs: each block's group_activity gate calibrated alone to a target
through the gated model at every bisection step (`calibrate_gates` with one gate, as stage mgs_single did before)
against on the block's dense input recorded once (`calibrate_gate_alone`, what it does now).

The two alternate per block, `--repeats` times, in one process, one thread (as the stage's jobs run); every offset
must be equal between them.

    python benchmarks/single_block_calibration.py --repeats 3 --target 0.9

Needs the study's data, model and mgs_local stages. Writes results/<study>/benchmark/single_block_calibration.json
(or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

from detr_sparsity.data.dataset import image_processor, load_split
from detr_sparsity.mgs.calibration import calibrate_gate_alone, calibrate_gates, calibration_front_end
from detr_sparsity.mgs.gates import load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.pipeline import path

from _common import arguments, parse, report

VARIANTS = {
    "through_the_model": lambda model, name, gate, cache, index, target, size:
        calibrate_gates(model, {name: gate}, cache, index, target, size),
    "recorded_inputs": calibrate_gate_alone,
}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "single_block_calibration", repeats=3, threads="mgs_single jobs")
    parser.add_argument("--target", type=float, default=0.9)
    args, cfg = parse(parser, argv)
    model = load_detr(path("model", "out", cfg.name))
    local = path("mgs_local", "gates", cfg.name)
    size = cfg.evaluate["batch_size"]
    split = load_split(path("data", "out", cfg.name), cfg.profile["split"])
    cache = calibration_front_end(model, split, image_processor(cfg.input), size)
    index = list(range(len(cache)))
    seconds = {name: [] for name in VARIANTS}
    offsets = {name: {} for name in VARIANTS}
    for _ in range(args.repeats):
        for name, calibrate in VARIANTS.items():
            start = time.perf_counter()
            for block, gate in load_gates(local).items():
                offsets[name][block] = calibrate(model, block, gate, cache, index, args.target, size)["offset"]
            seconds[name].append(time.perf_counter() - start)
    if offsets["through_the_model"] != offsets["recorded_inputs"]:
        raise SystemExit(f"error: the offsets differ: {offsets}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"benchmark": "single_block_calibration", "target": args.target, "images": len(cache),
              "blocks": len(offsets["recorded_inputs"]), "threads": args.threads, "repeats": args.repeats,
              "seconds": seconds, "median_seconds": median,
              "speedup": median["through_the_model"] / median["recorded_inputs"], "offsets": offsets["recorded_inputs"]}
    return report(result, args.out, cfg.name,
                  f"every block alone at {args.target}: {median['through_the_model']:.1f} s through the model, "
                  f"{median['recorded_inputs']:.1f} s on recorded inputs ({result['speedup']:.2f}x), the same offsets")


if __name__ == "__main__":
    sys.exit(main())
