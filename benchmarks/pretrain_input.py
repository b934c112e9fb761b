"""Pretraining with each image prepared once against prepared every time it is drawn: seconds per step, same bits.

The model stage's loop reads, decodes, resizes and normalises every image it draws, in the training process
(the two vCPUs are busy with the step itself, so a DataLoader worker only competes with it). `pretrain()` now
keeps each (image, orientation) as DETR's processor prepared it (`models.pretrain.HorizontalFlip`). Both variants
train a fresh small DETR through the pipeline's own `pretrain()` from the same seed on the first `--images`
images of the study's train split (so that a short run draws each image several times, as the 5,500 steps of 16
draw each of 8,000 images 11 times); the variants alternate, `--repeats` times each. The trained weights must be
identical: keeping the prepared images changes what a step costs, not what it computes.

    python benchmarks/pretrain_input.py --steps 240 --images 640 --repeats 2

Needs the study's data stage. Writes results/<study>/benchmark/pretrain_input.json (or --out).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.models import pretrain as pretraining
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.pipeline import path

from _common import arguments, parse, report

VARIANTS = {"prepared_each_draw": 0, "prepared_once": pretraining.PREPARED_BYTES}


def train(cfg, train_split, steps: int, kept_bytes: int) -> tuple[float, dict]:
    pretraining.PREPARED_BYTES = kept_bytes
    settings = {**cfg.model["pretrain"], "steps": steps, "checkpoint_every": steps + 1}
    torch.manual_seed(cfg.seed)
    model = build_small_detr(small_detr_config(cfg.model["architecture"], train_split.dataset.categories))
    collate = DetrCollate(image_processor(cfg.input), with_labels=True)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        pretraining.pretrain(model, train_split, collate, settings, cfg.seed, Path(scratch) / "checkpoint.pt",
                             lambda step, metrics: None)
        seconds = time.perf_counter() - start
    return seconds / steps, model.state_dict()


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "pretrain_input", repeats=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model stage runs on every core)")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--images", type=int, default=640, help="the first N train images")
    args, cfg = parse(parser, argv)
    train_split = CocoDetection(load_split(path("data", "out", cfg.name), "train"))
    images = Subset(train_split, range(min(args.images, len(train_split))))
    images.categories = train_split.categories
    per_step: dict[str, list[float]] = {name: [] for name in VARIANTS}
    weights: dict[str, dict] = {}
    load = [round(os.getloadavg()[0], 2)]
    for _ in range(args.repeats):
        for name, kept in VARIANTS.items():
            seconds, weights[name] = train(cfg, images, args.steps, kept)
            per_step[name].append(seconds)
            print(f"{name}: {seconds * 1e3:.1f} ms per step", file=sys.stderr)
    load.append(round(os.getloadavg()[0], 2))
    same = all(torch.equal(weights["prepared_once"][k], v) for k, v in weights["prepared_each_draw"].items())
    medians = {name: statistics.median(v) for name, v in per_step.items()}
    speedup = medians["prepared_each_draw"] / medians["prepared_once"]
    result = {
        "benchmark": "pretrain_input", "steps": args.steps, "images": len(images),
        "batch_size": cfg.model["pretrain"]["batch_size"], "threads": args.threads, "repeats": args.repeats,
        "seconds_per_step": per_step, "median_seconds_per_step": medians, "speedup": speedup,
        "identical_weights": same, "load_average": {"start": load[0], "end": load[1]},
    }
    return report(result, args.out, cfg.name,
                  f"pretraining, {args.steps} steps on {len(images)} images: {medians['prepared_each_draw'] * 1e3:.1f} "
                  f"ms per step preparing each draw, {medians['prepared_once'] * 1e3:.1f} preparing each image once "
                  f"({speedup:.2f}x), weights {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    sys.exit(main())
