"""Pretraining's preparation of the train images (`TrainImages`: each image read, decoded and resized by DETR's
processor, as it is and mirrored) on one thread against the pretraining job's threads, on the study's train split.

The two alternate, --repeats times, each preparing the whole split; what they prepare must be equal (pixels and
labels of both orientations, image ids and sizes, in order). The preparation runs once, at the start of pretraining,
on its critical path.

    python benchmarks/train_image_threads.py --repeats 2 --threads 2

Writes results/<study>/benchmark/train_image_threads.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from detr_sparsity.data.dataset import CocoDetection, image_processor, load_split
from detr_sparsity.data.train_images import TrainImages
from detr_sparsity.pipeline import path

from _common import arguments, parse, report


def _same(a: TrainImages, b: TrainImages) -> bool:
    if (a.image_ids, a.orig_sizes) != (b.image_ids, b.orig_sizes):
        return False
    return all(torch.equal(x, y) and all(torch.equal(lx[k], ly[k]) for k in lx)
               for pair_a, pair_b in zip(a.prepared, b.prepared, strict=True)
               for (x, lx), (y, ly) in zip(pair_a, pair_b, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "train_image_threads", repeats=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the pretraining job (Snakemake: 2)")
    args, cfg = parse(parser, argv)
    train = CocoDetection(load_split(path("data", "out", cfg.name), "train"))
    processor = image_processor(cfg.input)
    variants = {"one_thread": 1, "job_threads": args.threads}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    prepared: dict[str, TrainImages] = {}
    for _ in range(args.repeats):
        for name, threads in variants.items():
            torch.set_num_threads(threads)  # TrainImages prepares on torch's thread count, as the job sets it
            start = time.perf_counter()
            prepared[name] = TrainImages(train, processor, cfg.seed)
            seconds[name].append(time.perf_counter() - start)
    if not _same(prepared["one_thread"], prepared["job_threads"]):
        print("error: the images prepared on one thread and on several differ", file=sys.stderr)
        return 1
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"benchmark": "train_image_threads", "study": cfg.name, "images": len(train), "repeats": args.repeats,
              "threads": variants, "seconds": seconds, "median_seconds": median,
              "speedup": median["one_thread"] / median["job_threads"], "same_images": True}
    return report(result, args.out, cfg.name,
                  f"preparing {len(train)} train images: {median['one_thread']:.1f} s on 1 thread, "
                  f"{median['job_threads']:.1f} s on {args.threads} ({result['speedup']:.2f}x), the same images")


if __name__ == "__main__":
    sys.exit(main())
