"""What pretraining's compact FFN blocks save: a pretraining step of the study's small DETR with its FFN blocks as
DETR computes them (fc1, ReLU, fc2 on every hidden unit; the L1 penalty read from fc1's output, as pretraining did
before) against `compact_ffns` (fc2 and the backward pass on the units some token of the batch fired).

The step is pretraining's: DETR's loss with one-to-many matching, the L1 penalty of the study's weight, backward,
gradient clipping and AdamW, on the study's prepared train batches, `--threads` torch threads (the model stage runs on
every core). Two regimes, the variants alternating in blocks of `--block` steps within one process:
- `from_scratch`: a freshly initialised model trained `--steps` steps (warm-up as the study's), the blocks
  alternating along the way, so both variants see the same evolving sparsity;
- `pretrained`: the study's pretrained model (its batch norm trainable again), `--repeats` blocks each.
Before the timing, one batch's gradients of the two variants must agree.

    python benchmarks/compact_ffn.py --steps 600 --repeats 6

Needs the study's data and model stages. Writes results/<study>/benchmark/compact_ffn.json (or --out).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from detr_sparsity.data.dataset import CocoDetection, image_processor, load_split
from detr_sparsity.data.train_images import TrainImages
from detr_sparsity.models.compact_ffn import compact_ffns
from detr_sparsity.models.denoising import repeat_targets
from detr_sparsity.models.load import load_detr
from detr_sparsity.models.pretrain import ActivationL1
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config, trainable_batch_norm
from detr_sparsity.pipeline import path
from detr_sparsity.sparsity.ffn import ffn_blocks

from _common import arguments, parse, report


class _HookedL1:
    """The L1 penalty as pretraining read it before the compact blocks: a forward hook on each dense block's fc1."""

    def __init__(self, model, weight: float) -> None:
        self.weight, self.means = weight, []
        self.handles = [block.fc1.register_forward_hook(lambda _m, _i, out: self.means.append(torch.relu(out).mean()))
                        for block in ffn_blocks(model).values()]

    def take(self):
        means, self.means = self.means, []
        return self.weight * torch.stack(means).sum()


@contextmanager
def dense(model, weight):
    penalty = _HookedL1(model, weight)
    try:
        yield penalty, {}
    finally:
        for handle in penalty.handles:
            handle.remove()


@contextmanager
def compact(model, weight):
    with compact_ffns(model) as blocks:
        yield ActivationL1(blocks, weight), blocks


VARIANTS = {"dense": dense, "compact": compact}


class Trainer:
    """Pretraining's step on one model and optimizer, whichever FFN variant is installed."""

    def __init__(self, model, settings: dict, batches: list[dict]) -> None:
        self.model, self.settings, self.batches, self.step_count = model, settings, batches, 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                                           weight_decay=settings["weight_decay"])
        trainable_batch_norm(model)
        model.train()

    def step(self, penalty) -> None:
        batch = self.batches[self.step_count % len(self.batches)]
        warmup = self.settings["warmup_steps"]
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings["learning_rate"] * min(1.0, (self.step_count + 1) / warmup)
        labels = repeat_targets(batch["labels"], self.settings["target_copies"])
        out = self.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels)
        loss = out.loss + penalty.take()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["grad_clip"])
        self.optimizer.step()
        self.step_count += 1

    def block(self, variant: str, steps: int) -> tuple[float, float | None]:
        """(seconds per step, share of hidden units fired) of `steps` steps with `variant` installed."""
        weight = self.settings["activation_l1"]
        with VARIANTS[variant](self.model, weight) as (penalty, blocks):
            fired = []
            start = time.perf_counter()
            for _ in range(steps):
                self.step(penalty)
                if blocks:
                    fired.append(sum(b.fired for b in blocks.values())
                                 / sum(b.fc1.out_features for b in blocks.values()))
            seconds = (time.perf_counter() - start) / steps
        return seconds, statistics.mean(fired) if fired else None


def gradients_agree(model, settings: dict, batch: dict) -> float:
    """The largest gradient difference of the two variants on one batch, relative to the gradients' largest value."""
    grads = {}
    for variant in VARIANTS:
        trainer = Trainer(copy.deepcopy(model), settings, [batch])
        with VARIANTS[variant](trainer.model, settings["activation_l1"]) as (penalty, _blocks):
            labels = repeat_targets(batch["labels"], settings["target_copies"])
            out = trainer.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels)
            (out.loss + penalty.take()).backward()
        grads[variant] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return float((grads["dense"] - grads["compact"]).abs().max() / grads["dense"].abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, "compact_ffn", repeats=6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the model stage runs on every core)")
    parser.add_argument("--steps", type=int, default=600, help="steps trained from scratch, the variants alternating")
    parser.add_argument("--block", type=int, default=25, help="steps per block of one variant")
    parser.add_argument("--batches", type=int, default=64, help="distinct train batches cycled through")
    args, cfg = parse(parser, argv)
    settings = cfg.model["pretrain"]
    if settings["denoising"]["groups"] > 0:
        raise SystemExit("error: this benchmark times pretraining without denoising queries")
    train = CocoDetection(load_split(path("data", "out", cfg.name), "train"))
    data = TrainImages(train, image_processor(cfg.input), cfg.seed)
    size = settings["batch_size"]
    batches = [data.collate([data[i] for i in range(k * size, (k + 1) * size)]) for k in range(args.batches)]

    torch.manual_seed(cfg.seed)
    fresh = build_small_detr(small_detr_config(cfg.model["architecture"], train.categories))
    pretrained = load_detr(path("model", "out", cfg.name))
    agreement = {"from_scratch": gradients_agree(fresh, settings, batches[0]),
                 "pretrained": gradients_agree(pretrained, settings, batches[0])}
    if max(agreement.values()) > 1e-4:
        raise SystemExit(f"error: the variants' gradients differ: {agreement}")

    regimes = {}
    runs = {"from_scratch": (Trainer(fresh, settings, batches), args.steps // (2 * args.block)),
            "pretrained": (Trainer(pretrained, settings, batches), args.repeats)}
    for regime, (trainer, pairs) in runs.items():
        blocks = {variant: [] for variant in VARIANTS}
        for _ in range(pairs):
            for variant in VARIANTS:
                blocks[variant].append(trainer.block(variant, args.block))
        ms = {v: statistics.median(s for s, _ in blocks[v]) * 1e3 for v in VARIANTS}
        regimes[regime] = {
            "steps_per_block": args.block, "blocks_per_variant": pairs,
            "ms_per_step": {v: [round(s * 1e3, 1) for s, _ in blocks[v]] for v in VARIANTS},
            "median_ms_per_step": ms, "speedup": ms["dense"] / ms["compact"],
            # each compact block against the dense block just before it: the same stretch of training
            "speedup_per_pair": [round(d / c, 3) for (d, _), (c, _) in zip(blocks["dense"], blocks["compact"])],
            "units_fired": [round(f, 3) for _, f in blocks["compact"]],
        }
    result = {"benchmark": "compact_ffn", "threads": args.threads, "gradient_difference": agreement,
              "regimes": regimes}
    line = "; ".join(f"{r}: {v['median_ms_per_step']['dense']:.0f} ms dense, {v['median_ms_per_step']['compact']:.0f} "
                     f"ms compact per step ({v['speedup']:.2f}x)" for r, v in regimes.items())
    return report(result, args.out, cfg.name, line)


if __name__ == "__main__":
    sys.exit(main())
