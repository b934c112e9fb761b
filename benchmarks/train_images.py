"""Pretraining's input, prepared once against read and processed every step: the pipeline's `pretrain()` of a git
revision before the change and of this checkout, side by side, on the study's train split.

Each variant trains a fresh small DETR (seed 0) for --steps steps of the study's recipe in its own process, the
two alternating --repeats times, on the same machine in one run. Reported per variant: seconds per step (the
median over repeats; the loop only, from the first step's start), seconds from the call to the first step (the
preparation), and a digest of the trained weights: equal digests mean the two trained on the same inputs.

    python benchmarks/train_images.py --before e735355 --steps 300

Needs the study's data stage (results/<study>/data) and git. Writes results/<study>/benchmark/train_images.json
(or --out).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import arguments, parse, report

ROOT = Path(__file__).resolve().parents[1]


def train_once(params: Path, steps: int, threads: int) -> dict:
    """One variant's run, in the process of the checkout whose `src` is first on the import path."""
    import torch

    from detr_sparsity.config import load_config
    from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
    from detr_sparsity.models.pretrain import pretrain
    from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
    from detr_sparsity.pipeline import path

    torch.set_num_threads(threads)
    cfg = load_config(params)
    train = CocoDetection(load_split(path("data", "out", cfg.name), "train"))
    torch.manual_seed(cfg.seed)
    model = build_small_detr(small_detr_config(cfg.model["architecture"], train.categories))
    settings = {**cfg.model["pretrain"], "steps": steps, "checkpoint_every": steps + 1}
    processor = image_processor(cfg.input)
    # Before the change pretrain() took the collate function; now the processor.
    inputs = (processor if "processor" in inspect.signature(pretrain).parameters
              else DetrCollate(processor, with_labels=True))
    first_step = []
    call = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        pretrain(model, train, inputs, settings, cfg.seed, Path(scratch) / "checkpoint.pt",
                 lambda step, metrics: first_step.append(time.perf_counter()) if step == 1 else None)
    end = time.perf_counter()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    # The first step's own time is not known before its end: the loop's steps after it, per step.
    return {"seconds_per_step": (end - first_step[0]) / (steps - 1), "seconds_to_first_step": first_step[0] - call,
            "weights_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "train_images", repeats=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model stage runs on every core)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--before", required=True, help="the git revision before the change")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, cfg = parse(parser, argv)
    if args.child:
        print(json.dumps(train_once(args.params, args.steps, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)
        try:
            sources = {"before": before / "src", "after": ROOT / "src"}
            for _ in range(args.repeats):
                for variant, source in sources.items():
                    env = {**os.environ, "PYTHONPATH": str(source)}
                    out = subprocess.run([sys.executable, __file__, "--child", "--before", args.before, "--params",
                                          str(args.params), "--steps", str(args.steps), "--threads", str(args.threads)],
                                         env=env, check=True, capture_output=True, text=True).stdout
                    runs[variant].append(json.loads(out.strip().splitlines()[-1]))
                    print(f"{variant}: {runs[variant][-1]['seconds_per_step'] * 1e3:.1f} ms per step", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    median = {v: statistics.median(r["seconds_per_step"] for r in runs[v]) for v in runs}
    identical = len({r["weights_sha256"] for v in runs for r in runs[v]}) == 1
    result = {
        "benchmark": "train_images", "before": args.before, "steps": args.steps, "threads": args.threads,
        "repeats": args.repeats, "runs": runs, "median_seconds_per_step": median,
        "speedup": median["before"] / median["after"], "same_weights": identical,
        "pretraining_minutes_at_study_steps": {v: median[v] * cfg.model["pretrain"]["steps"] / 60 for v in median},
    }
    return report(result, args.out, cfg.name,
                  f"pretraining step {median['before'] * 1e3:.1f} ms before, {median['after'] * 1e3:.1f} ms after "
                  f"({result['speedup']:.2f}x); same weights: {identical}")


if __name__ == "__main__":
    sys.exit(main())
