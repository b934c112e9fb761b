"""Generating the synthetic study's images in one process against several (`generate_synthetic(..., processes)`, as
the data stage does on every core of its job): `--images` train images of the study's `data` settings, the variants
alternating `--repeats` times; their files must be equal byte for byte.

    python benchmarks/synthetic_generation.py --images 1000 --repeats 2

Writes results/<study>/benchmark/synthetic_generation.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from detr_sparsity.data.synthetic import SyntheticSpec, generate_synthetic
from detr_sparsity.machine import job_cores

from _common import arguments, parse, report


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "synthetic_generation", repeats=2)
    parser.add_argument("--images", type=int, default=1000, help="train images generated per run")
    parser.add_argument("--processes", type=int, default=job_cores(), help="the parallel variant's processes")
    args, cfg = parse(parser, argv)
    if cfg.data["source"] != "synthetic":
        raise SystemExit(f"error: study {cfg.name} does not generate its data (data.source: {cfg.data['source']})")
    spec = SyntheticSpec(num_images=0, **{k: cfg.data[k] for k in (
        "image_size", "num_classes", "min_objects", "max_objects", "count_decay")})
    seconds: dict[int, list[float]] = {1: [], args.processes: []}
    files = {}
    for _ in range(args.repeats):
        for processes in seconds:
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                generate_synthetic(Path(out), {"train": args.images}, spec, cfg.seed, processes)
                seconds[processes].append(time.perf_counter() - start)
                files[processes] = _files(Path(out))
    if files[1] != files[args.processes]:
        print("error: the images or annotations differ between one process and several", file=sys.stderr)
        return 1
    medians = {n: statistics.median(s) for n, s in seconds.items()}
    speedup = medians[1] / medians[args.processes]
    result = {"benchmark": "synthetic_generation", "study": cfg.name, "images": args.images, "repeats": args.repeats,
              "processes": args.processes, "seconds": {str(n): s for n, s in seconds.items()},
              "median_seconds": {str(n): m for n, m in medians.items()}, "speedup": speedup, "same_files": True}
    return report(result, args.out, cfg.name,
                  f"{args.images} images: {medians[1]:.1f} s in one process, {medians[args.processes]:.1f} s in "
                  f"{args.processes} ({speedup:.2f}x); the same files")


if __name__ == "__main__":
    sys.exit(main())
