"""How large is the cache of the FFN blocks' dense inputs (`mgs/block_inputs.py`) on the paper's model?

A randomly initialised full-size DETR-R50 (transformers' own ResNet-50, d 256, H 2048, 6 + 6 layers, 100 queries;
built locally, no hub) runs a few random images at 800 x 1066, batch 1 (no padding: every encoder position is
real), once, with one recorder per `tokens_per_image` setting installed together. The recorded values do not
depend on the weights, only the counts and bytes are reported: per image and block, per image, on disk (safetensors,
saved through `BlockInputs.save`), and for whole caches of N images. The process's peak RSS covers the model, the
forward at 800 x 1066 and every recording.

An 800 x 1066 input is what DETR's resize (shortest edge 800, longest 1333) makes of a 4:3 landscape or portrait
COCO image, the usual case; at stride 32 it is 25 x 34 = 850 encoder tokens. The widest COCO images reach
800 x 1333 (25 x 42 = 1050 tokens), so an uncapped cache of real COCO images is up to 1.24x the figures here;
a capped one (tokens_per_image 64 or 256) is not, as every image has more real tokens than the cap.

Measured (benchmarks/results/block_inputs_memory.json; AMD EPYC, AVX2 only, 2 vCPUs shared, load average 3.4-4.3;
3 images, one thread, forwards 11-13 s each). Bytes are exact (float32 rows of 256 plus an int64 image index:
1032 bytes a token); the file adds a header of about 2 kB:
- every real token (tokens_per_image 0): 5.88 MB per image (encoder 6 x 850 tokens 5.26 MB, decoder 6 x 100
  queries 0.62 MB): 11.8 GB for the coco study's 2,000 train images, 47 GB for 8,000, 696 GB for train2017;
- tokens_per_image 256: 2.20 MB per image (the decoder's 100 queries all kept): 4.4 GB / 17.6 GB / 261 GB;
- tokens_per_image 64: 0.79 MB per image: 1.6 GB / 6.3 GB / 94 GB.
Peak RSS 1026 MB (390 at start, 562 with the model built, the rest the forward at 800 x 1066); the recordings of
3 images are a rounding error in it. The stage holds the whole cache in memory until it is saved (saving makes no
second copy, measured: peak RSS unchanged by `save` of a 614 MB cache), beside the front-end cache (0.87 MB per
image at 850 tokens): an uncapped 2,000-image COCO cache needs about 17 GB at its peak (joining the batches
adds one block, 2 GB), within the 32 GB its job asks for; 64 tokens per image, about 4 GB.

    PYTHONPATH=src nice python benchmarks/block_inputs_memory.py   # writes benchmarks/results/block_inputs_memory.json
    PYTHONPATH=src nice python benchmarks/block_inputs_memory.py --images 2 --cache-images 2000 118287
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import transformers

from detr_sparsity.atomic import write_json
from detr_sparsity.machine import environment
from detr_sparsity.mgs.block_inputs import BlockInputs, record_block_inputs


def detr_r50() -> transformers.DetrForObjectDetection:
    """facebook/detr-resnet-50's architecture (revision no_timm), randomly initialised."""
    backbone = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                         hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                         out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                     d_model=256, encoder_ffn_dim=2048, decoder_ffn_dim=2048, encoder_layers=6,
                                     decoder_layers=6, num_queries=100, num_labels=91)
    return transformers.DetrForObjectDetection(config).eval()


def rss_megabytes() -> float:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_megabytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def summary(recorded: BlockInputs, path: Path, cache_images: list[int]) -> dict:
    n = len(recorded)
    per_block = {name: nbytes / n for name, nbytes in recorded.nbytes().items()}
    per_image = sum(per_block.values())
    recorded.save(path)
    file_per_image = path.stat().st_size / n
    return {"tokens_per_image_per_block": {name: count / n for name, count in recorded.tokens().items()},
            "bytes_per_image_per_block": per_block,
            "bytes_per_image": per_image,
            "encoder_bytes_per_image": sum(v for k, v in per_block.items() if k.startswith("encoder")),
            "decoder_bytes_per_image": sum(v for k, v in per_block.items() if k.startswith("decoder")),
            "file_bytes_per_image": file_per_image,
            "file_bytes": path.stat().st_size,
            "cache_gigabytes": {str(images): round(file_per_image * images / 1e9, 3) for images in cache_images}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="images recorded, batch 1 (a forward takes seconds)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--tokens-per-image", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--cache-images", type=int, nargs="+", default=[2000, 8000, 118287],
                        help="whole caches to size: the coco study's 2000 train images, 8000, all of train2017")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/block_inputs_memory.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = list(os.getloadavg())
    rss_start = rss_megabytes()
    model = detr_r50()
    rss_model = rss_megabytes()
    generator = torch.Generator().manual_seed(args.seed)
    seconds = []
    with ExitStack() as stack, torch.no_grad():
        recordings = {k: stack.enter_context(record_block_inputs(model, tokens_per_image=k, seed=args.seed))
                      for k in args.tokens_per_image}
        for i in range(args.images):
            pixels = torch.randn(1, 3, args.height, args.width, generator=generator)
            start = time.perf_counter()
            model(pixel_values=pixels, pixel_mask=torch.ones(1, args.height, args.width, dtype=torch.long))
            seconds.append(time.perf_counter() - start)
            print(f"image {i + 1}/{args.images}: forward {seconds[-1]:.1f} s, RSS {rss_megabytes():.0f} MB", flush=True)
    rss_forwards = rss_megabytes()
    settings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, recording in recordings.items():
            recorded = recording.block_inputs()
            settings[str(k)] = summary(recorded, Path(tmp) / f"block_inputs_{k}.safetensors", args.cache_images)
            del recorded
    result = {
        "benchmark": "block_inputs_memory",
        "model": "DETR-R50 (random weights): d 256, H 2048, 6 encoder + 6 decoder FFN blocks, 100 queries",
        "input": {"height": args.height, "width": args.width, "batch_size": 1, "images": args.images,
                  "encoder_tokens_per_image": -(-args.height // 32) * -(-args.width // 32)},
        "dtype": "float32 inputs, int64 image indices",
        "tokens_per_image": settings,
        "forward_seconds": [round(s, 2) for s in seconds],
        "rss_megabytes": {"start": round(rss_start, 1), "model_built": round(rss_model, 1),
                          "after_forwards": round(rss_forwards, 1), "peak": round(peak_rss_megabytes(), 1)},
        "environment": {**environment(), "load_average": {"start": load_start, "end": list(os.getloadavg())}},
    }
    write_json(args.out, result)
    for k, s in settings.items():
        print(f"tokens_per_image {k}: {s['bytes_per_image'] / 1e6:.3f} MB per image in memory, "
              f"{s['file_bytes_per_image'] / 1e6:.3f} MB on disk; whole caches (GB): {s['cache_gigabytes']}")
    print(f"peak RSS {result['rss_megabytes']['peak']:.0f} MB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
