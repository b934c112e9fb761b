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

Needs the study's data stage (results/<study>/data). Writes results/<study>/benchmark/pretrain_recipes/<name>.json
(or --out). Nothing of the pipeline's outputs is touched: the model is kept only in memory.
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "pretrain_recipes/<name>", repeats=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model stage runs on every core)")
    parser.add_argument("--name", required=True, help="the recipe's name (its result file)")
    parser.add_argument("--steps", type=int, required=True, help="the training budget, in steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pretrain settings overridden")
    parser.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE", help="architecture settings overridden")
    parser.add_argument("--input", nargs="*", default=[], metavar="KEY=VALUE",
                        help="input size overridden (shortest_edge, longest_edge), for training and evaluation")
    args, cfg = parse(parser, argv)
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
    with tempfile.TemporaryDirectory() as scratch:
        pretrain(model, train, image_processor(cfg.input), settings, cfg.seed,
                 Path(scratch) / "checkpoint.pt", lambda step, metrics: None)
        seconds = time.perf_counter() - start
        measured = evaluate_policies(model, evaluation_split(cfg, data), {}, Path(scratch) / "detections.json")
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
    return report(result, args.out, cfg.name,
                  f"{args.name}: {settings['steps']} steps in {minutes:.1f} min ({seconds / settings['steps']:.3f} s per "
                  f"step), AP {measured['AP']:.3f}, AP50 {measured['AP50']:.3f}, natural sparsity "
                  f"{measured['natural_sparsity']['overall']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
