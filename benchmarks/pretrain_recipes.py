"""Pretraining recipes at a fixed short budget: the dense AP50 a recipe reaches, per minute of training.

A full pretraining of the default study takes most of its time (5,500 steps: 46-56 min on a 2-vCPU AVX2 machine),
so recipes are compared as pilots: each trains a fresh small DETR through the pipeline's own `pretrain()` on the
study's train split for `--steps` steps, with its schedule (warm-up, cosine decay, the one-to-many phase) compressed
to those steps, then is scored on the study's evaluation split by the pipeline's own evaluation (COCO AP, natural
sparsity per FFN block). A recipe is the study's `pretrain` and `architecture` settings with overrides:

    python benchmarks/pretrain_recipes.py --name base --steps 1800
    python benchmarks/pretrain_recipes.py --name lr1e-3 --steps 1800 --set learning_rate=1e-3
    python benchmarks/pretrain_recipes.py --name b8 --steps 3600 --set batch_size=8
    python benchmarks/pretrain_recipes.py --name in96 --steps 5500 --input shortest_edge=96 longest_edge=96
    python benchmarks/pretrain_recipes.py --name dn2 --steps 1800 \
        --set 'denoising={"groups": 2, "box_noise": 0.4, "label_noise": 0.2}'
    python benchmarks/pretrain_recipes.py --name l1-1-4400-ema --steps 4400 --ema 0.998 0.9995

`--ema` also scores exponential moving averages of the weights (each decay's average kept beside the training,
updated after every optimizer step through `pretrain()`'s step callback, its decay warmed up as min(decay,
(1 + t) / (10 + t))): the same training scored as trained and as averaged, a paired comparison. The warm-up bounds
the decay until step 9 d / (1 - d) (4,491 for 0.998), so at shorter budgets every decay above it gives one average,
the warm-up's own (each step's weight about (s / t)^9: mostly the last tenth of the steps).

Needs the study's data stage (results/<study>/data). Writes results/<study>/benchmark/pretrain_recipes/<name>.json
(or --out). Nothing of the pipeline's outputs is touched: the model is kept only in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from detr_sparsity.config import InputSize
from detr_sparsity.data.dataset import CocoDetection, image_processor, load_split
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.machine import machine
from detr_sparsity.models.pretrain import pretrain
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.pipeline import path

from _common import arguments, parse, report


def overridden(settings: dict, overrides: list[str], what: str) -> dict:
    """`settings` with each `key=value` of `overrides` (a JSON value) replacing a key it has; a bad item stops the
    benchmark before any training, naming it and what is allowed."""
    settings = dict(settings)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in settings:
            raise SystemExit(f"error: {item!r}: expected key=value with a key of the study's {what} settings "
                             f"({', '.join(settings)})")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"error: {item!r}: the value of {key} must be JSON (a number, true/false, a list), "
                             f"e.g. {key}={json.dumps(settings[key])}") from None
    return settings


class WeightAverages:
    """Exponential moving averages of `model`'s floating-point weights, one per decay (`kept[decay]`), updated after
    each optimizer step as `pretrain()`'s step callback; the decay warmed up as min(decay, step / (9 + step)), step
    1-based (the first average is the first step's weights)."""

    def __init__(self, model: torch.nn.Module, decays: list[float]) -> None:
        self.model, self.decays = model, list(decays)
        self.kept: dict[float, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, step: int, metrics: dict | None = None) -> None:
        weights = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        for decay in self.decays:
            kept = self.kept.setdefault(decay, {k: v.clone() for k, v in weights.items()})
            for k, v in kept.items():
                v.lerp_(weights[k], 1.0 - min(decay, step / (9 + step)))


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "pretrain_recipes/<name>", repeats=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model stage runs on every core)")
    parser.add_argument("--name", required=True, help="the recipe's name (its result file)")
    parser.add_argument("--steps", type=int, required=True, help="the training budget, in steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pretrain settings overridden")
    parser.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE", help="architecture settings overridden")
    parser.add_argument("--input", nargs="*", default=[], metavar="KEY=VALUE",
                        help="input size overridden (shortest_edge, longest_edge), for training and evaluation")
    parser.add_argument("--ema", nargs="*", type=float, default=[], metavar="DECAY",
                        help="also score the weights' exponential moving averages with these decays, in (0, 1)")
    args, cfg = parse(parser, argv)
    if any(not 0.0 < decay < 1.0 for decay in args.ema):
        raise SystemExit(f"error: --ema {' '.join(map(str, args.ema))}: every decay must be strictly between 0 and 1")
    if cfg.model["source"] != "pretrain":
        raise SystemExit(f"error: study {cfg.name} does not pretrain its model (model.source: {cfg.model['source']})")
    settings = overridden({**cfg.model["pretrain"], "steps": args.steps}, args.set, "pretrain")
    settings["checkpoint_every"] = settings["steps"] + 1  # a pilot is not resumed
    architecture = overridden(cfg.model["architecture"], args.arch, "architecture")
    cfg = dataclasses.replace(cfg, input=InputSize(**overridden(dataclasses.asdict(cfg.input), args.input, "input")))
    data = path("data", "out", cfg.name)
    train = CocoDetection(load_split(data, "train"))
    torch.manual_seed(cfg.seed)
    model = build_small_detr(small_detr_config(architecture, train.categories))
    at_start = machine()
    start = time.perf_counter()
    averages = WeightAverages(model, args.ema)
    with tempfile.TemporaryDirectory() as scratch:
        pretrain(model, train, image_processor(cfg.input), settings, cfg.seed, Path(scratch) / "checkpoint.pt",
                 averages)
        seconds = time.perf_counter() - start
        split = evaluation_split(cfg, data)
        measured = evaluate_policies(model, split, {}, Path(scratch) / "detections.json")
        averaged = {}
        for decay, kept in averages.kept.items():
            ema = copy.deepcopy(model)
            missing, unexpected = ema.load_state_dict(kept, strict=False)
            if unexpected or any(ema.state_dict()[k].is_floating_point() for k in missing):
                raise RuntimeError(f"the averaged weights do not fit the trained model: {missing}, {unexpected}")
            scored = evaluate_policies(ema, split, {}, Path(scratch) / f"detections-ema-{decay}.json")
            averaged[str(decay)] = {"AP": scored["AP"], "AP50": scored["AP50"],
                                    "natural_sparsity": scored["natural_sparsity"]}
    minutes = seconds / 60
    result = {
        "benchmark": f"pretrain_recipes/{args.name}", "recipe": args.name, "steps": settings["steps"],
        "pretrain": settings, "architecture": architecture, "input": dataclasses.asdict(cfg.input), "threads": args.threads,
        "train_seconds": seconds, "seconds_per_step": seconds / settings["steps"],
        "images_seen": settings["steps"] * settings["batch_size"],
        "AP": measured["AP"], "AP50": measured["AP50"], "AP50_per_training_minute": measured["AP50"] / minutes,
        "natural_sparsity": measured["natural_sparsity"],
        "load_average": {"start": at_start["load_average"], "end": round(os.getloadavg()[0], 2)},
    }
    if averaged:
        result["ema"] = averaged  # the same training's weights averaged, per decay
    return report(result, args.out, cfg.name,
                  f"{args.name}: {settings['steps']} steps in {minutes:.1f} min ({seconds / settings['steps']:.3f} s per "
                  f"step), AP {measured['AP']:.3f}, AP50 {measured['AP50']:.3f}, natural sparsity "
                  f"{measured['natural_sparsity']['overall']:.3f}"
                  + "".join(f"; averaged ({decay}): AP {v['AP']:.3f}, AP50 {v['AP50']:.3f}"
                            for decay, v in averaged.items()))


if __name__ == "__main__":
    sys.exit(main())
