"""The synthetic images' background (`data.synthetic._background`: a random gradient plus pixel noise) as it is drawn
now, from one ramp broadcast and summed in place, against as it was drawn until 2026-12-07, from full coordinate
grids (restated here as `before`): `--images` backgrounds of the study's image size each, from the same seeded
generators, the two alternating `--repeats` times; their pixels must be equal.

    python benchmarks/synthetic_background.py --images 2000 --repeats 3

Writes results/<study>/benchmark/synthetic_background.json (or --out).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
from PIL import Image

from detr_sparsity.data.synthetic import _background

from _common import arguments, parse, report


def before(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(40, 200, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1] + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "synthetic_background", repeats=3)
    parser.add_argument("--images", type=int, default=2000, help="backgrounds drawn per run")
    args, cfg = parse(parser, argv)
    size = cfg.data["image_size"]
    variants = {"before": before, "now": _background}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, draw in variants.items():
            start = time.perf_counter()
            for index in range(args.images):
                draw(np.random.default_rng([cfg.seed, 0, index]), size)
            seconds[name].append(time.perf_counter() - start)
    for index in range(args.images):
        images = [np.asarray(draw(np.random.default_rng([cfg.seed, 0, index]), size)) for draw in variants.values()]
        if not np.array_equal(*images):
            print(f"error: background {index} differs between the two", file=sys.stderr)
            return 1
    per_image = {name: 1e3 * statistics.median(s) / args.images for name, s in seconds.items()}
    result = {"benchmark": "synthetic_background", "study": cfg.name, "image_size": size, "images": args.images,
              "repeats": args.repeats, "seconds": seconds, "median_ms_per_image": per_image,
              "speedup": per_image["before"] / per_image["now"], "same_pixels": True}
    return report(result, args.out, cfg.name,
                  f"a {size} x {size} background: {per_image['before']:.2f} ms before, {per_image['now']:.2f} ms now "
                  f"({result['speedup']:.2f}x), the same pixels")


if __name__ == "__main__":
    sys.exit(main())
