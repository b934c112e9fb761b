"""Pretraining's batches, prepared once (`TrainImages`, what `pretrain()` reads) against read, decoded, mirrored and
processed by DETR's processor at every step (what it read before), on the study's train split.

Both make the batches of the first --batches steps of the study's recipe (epoch 0's seeded order, each image
mirrored where `is_flipped` says), alternating in blocks of 10 batches, --repeats times; every batch of the two must
be equal (pixel values, masks, labels). The step itself does not change: the loading time saved per step is the
pretraining time saved, less the preparation, which is timed once.

    python benchmarks/train_images.py --batches 200 --repeats 3

Writes results/<study>/benchmark/train_images.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split
from detr_sparsity.data.train_images import TrainImages, is_flipped, mirrored
from detr_sparsity.pipeline import path

from _common import arguments, parse, report

BLOCK = 10  # batches per timed block


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "train_images", repeats=3, threads="pretraining's loading (in its process)")
    parser.add_argument("--batches", type=int, default=200)
    args, cfg = parse(parser, argv)
    train = CocoDetection(load_split(path("data", "out", cfg.name), "train"))
    processor = image_processor(cfg.input)
    recipe = cfg.model["pretrain"]
    batch_size = recipe["batch_size"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(args.batches)]

    start = time.perf_counter()
    prepared = TrainImages(train, processor, cfg.seed)
    preparation = time.perf_counter() - start
    collate = DetrCollate(processor, with_labels=True)

    def read_each_step(indices: list[int]) -> dict:
        return collate([mirrored(*train[i]) if is_flipped(cfg.seed, 0, i) else train[i] for i in indices])

    def from_prepared(indices: list[int]) -> dict:
        return prepared.collate([prepared[i] for i in indices])

    variants = {"read_each_step": read_each_step, "prepared": from_prepared}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    made: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for first in range(0, len(batches), BLOCK):
            for name, make in variants.items():
                start = time.perf_counter()
                block = [make(indices) for indices in batches[first:first + BLOCK]]
                seconds[name].append(time.perf_counter() - start)
                if len(made[name]) < len(batches):
                    made[name].extend(block)
    for ours, theirs in zip(made["prepared"], made["read_each_step"], strict=True):
        same = all(torch.equal(ours[key], theirs[key]) for key in ("pixel_values", "pixel_mask", "orig_sizes")) and \
            all(torch.equal(a[k], b[k]) for a, b in zip(ours["labels"], theirs["labels"]) for k in a)
        if not same:
            print("error: the prepared batches differ from DETR's processor's", file=sys.stderr)
            return 1
    per_batch = {name: statistics.median(s) / BLOCK for name, s in seconds.items()}
    steps = recipe["steps"]
    saved = (per_batch["read_each_step"] - per_batch["prepared"]) * steps - preparation
    result = {
        "benchmark": "train_images", "study": cfg.name, "batch_size": batch_size, "batches": args.batches,
        "block": BLOCK, "repeats": args.repeats, "threads": args.threads, "block_seconds": seconds,
        "median_seconds_per_batch": per_batch, "speedup": per_batch["read_each_step"] / per_batch["prepared"],
        "preparation_seconds": preparation, "images": len(train), "same_batches": True,
        "pretraining_seconds_saved": {"steps": steps, "seconds": saved},
    }
    return report(result, args.out, cfg.name,
                  f"a batch of {batch_size}: {per_batch['read_each_step'] * 1e3:.1f} ms read each step, "
                  f"{per_batch['prepared'] * 1e3:.1f} ms prepared (preparing {len(train)} images: "
                  f"{preparation:.0f} s); over {steps} steps {saved / 60:.1f} min saved")


if __name__ == "__main__":
    sys.exit(main())
