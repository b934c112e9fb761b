"""Pretraining of the small DETR on the synthetic train split (no pretrained weights are reachable offline)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import DetrForObjectDetection, DetrImageProcessorPil

from detr_sparsity.atomic import atomic_path
from detr_sparsity.data.dataset import CocoDetection
from detr_sparsity.data.train_images import TrainImages
from detr_sparsity.models.compact_ffn import CompactFFN, compact_ffns
from detr_sparsity.models.denoising import DenoisingQueries, repeat_targets
from detr_sparsity.models.small_detr import freeze_batch_norm, trainable_batch_norm

log = logging.getLogger(__name__)

StepLogger = Callable[[int, dict[str, float]], None]


class ActivationL1:
    """The L1 penalty on the FFN hidden activations: the sum over blocks of each block's mean post-ReLU value,
    over the batch's tokens (encoder positions on batch padding included: the default study's square inputs have
    none; with denoising queries, their decoder tokens too).

    DETR's loss alone leaves the small stand-in at about 70 % natural FFN sparsity within the pipeline's budget,
    far from what is reported for DETR-R50 (README, "The stand-in"); the penalty (as ProSparse and D2DMoE use one)
    brings it into that regime. The compact blocks pretraining computes with (`compact_ffn`) hand it each forward
    pass's mean activation, so the model stays a standard `DetrForObjectDetection` and saves as one.
    """

    def __init__(self, blocks: Mapping[str, CompactFFN], weight: float) -> None:
        self.weight, self.means, self.blocks = weight, [], list(blocks.values()) if weight > 0 else []
        for block in self.blocks:
            block.on_mean = self.means.append

    def take(self) -> torch.Tensor | None:
        """The weighted penalty of the forward passes since the last call (None without a penalty)."""
        means, self.means[:] = list(self.means), []
        return self.weight * torch.stack(means).sum() if means else None

    def remove(self) -> None:
        for block in self.blocks:
            block.on_mean = None


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model: DetrForObjectDetection,
    dataset: CocoDetection,
    processor: DetrImageProcessorPil,
    settings: dict[str, Any],
    seed: int,
    checkpoint: Path,
    log_step: StepLogger,
) -> dict[str, float]:
    """Train `model` in place with DETR's set-prediction loss, plus `settings["activation_l1"]` times the FFN
    activations' L1 penalty (`ActivationL1`) and, with `settings["denoising"]["groups"]` > 0, the loss of that many
    groups of denoising queries (`DenoisingQueries`); resumes from `checkpoint` if present. `processor` prepares the
    images of `dataset` once, before the first step (`TrainImages`); every image is mirrored in half of its draws.

    One-to-many matching: for the first `one_to_many_fraction` of the steps each ground-truth box is repeated
    `target_copies` times, so Hungarian matching gives it that many queries. One-to-many assignment (as H-DETR and
    Group DETR use it) multiplies the positive training signal per image; a from-scratch DETR otherwise spends most
    of a CPU budget on a plateau where every class score stays uniform (measured: AP50 0.009 vs 0.070 after 1000
    steps). The last part of pretraining returns to DETR's one-to-one matching, so the model learns again to give
    each object a single query."""
    torch.manual_seed(seed)
    device = model.device  # batches follow the model
    trainable_batch_norm(model)
    steps, batch_size = settings["steps"], settings["batch_size"]
    data = TrainImages(dataset, processor, seed)  # read, decoded and resized once, not every step
    denoising = DenoisingQueries(model, **settings["denoising"]).to(device) \
        if settings["denoising"]["groups"] > 0 else None
    trained = [*model.parameters(), *(denoising.parameters() if denoising is not None else [])]
    optimizer = torch.optim.AdamW(
        [p for p in trained if p.requires_grad],
        lr=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, settings["warmup_steps"], steps)
    )
    step, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        if denoising is not None:
            denoising.load_state_dict(state["denoising"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, elapsed = state["step"], state["elapsed"]
        log.info("resuming pretraining from %s at step %d", checkpoint, step)

    model.train()
    # Computed by compact FFN blocks: the same function and gradients, fc2 and the backward pass only on the hidden
    # units that fired in the batch (benchmarks/compact_ffn.py).
    with compact_ffns(model) as blocks:
        penalty = ActivationL1(blocks, settings["activation_l1"])
        progress = tqdm(total=steps, initial=step, desc="pretrain", mininterval=10)
        start = time.perf_counter() - elapsed
        per_epoch = len(data) // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the train split ({len(data)} images)")
        while step < steps:
            # Epoch-seeded shuffling: a resumed run sees exactly the batches an uninterrupted one would.
            data.epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + data.epoch)).tolist()
            batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(offset, per_epoch)]
            loader = DataLoader(data, batch_sampler=batches, collate_fn=data.collate)
            for batch in loader:
                labels = [{k: v.to(device) for k, v in lab.items()} for lab in batch["labels"]]
                matched = repeat_targets(labels, settings["target_copies"]) \
                    if step < settings["one_to_many_fraction"] * steps else labels
                pixels = dict(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
                if denoising is None:
                    out = model(**pixels, labels=matched)
                    detr_loss, terms, dn_loss = out.loss, out.loss_dict, None
                else:
                    # Seeded per step: a resumed run draws the noise an uninterrupted one would.
                    noise = torch.Generator().manual_seed(seed * 1_000_003 + step)
                    detr_loss, dn_loss, terms = denoising.loss(model, pixels["pixel_values"], pixels["pixel_mask"],
                                                               labels, matched, noise)
                l1 = penalty.take()
                loss = sum(part for part in (detr_loss, dn_loss, l1) if part is not None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The DETR's gradient, as without denoising queries (its logged norm stays comparable across recipes).
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
                optimizer.step()
                scheduler.step()
                step += 1
                # "loss" stays DETR's own, comparable across recipes; the penalty and the denoising loss beside it.
                metrics = {"loss": detr_loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]}
                metrics.update({k: v.item() for k, v in terms.items()})
                if l1 is not None:
                    metrics["activation_l1"] = l1.item()
                if dn_loss is not None:
                    metrics["denoising_loss"] = dn_loss.item()
                if blocks:  # the share of hidden units fc2 and the backward pass computed (compact_ffn)
                    metrics["ffn_units_fired"] = (sum(b.fired for b in blocks.values())
                                                  / sum(b.fc1.out_features for b in blocks.values()))
                log_step(step, metrics)
                progress.update(1)
                if step % 50 == 0:
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}")
                    log.info("step %d/%d loss %.4f", step, steps, metrics["loss"])
                if step % settings["checkpoint_every"] == 0 and step < steps:
                    _save_checkpoint(checkpoint, model, denoising, optimizer, scheduler, step,
                                     time.perf_counter() - start)
                if step >= steps:
                    break
        progress.close()
        penalty.remove()
    freeze_batch_norm(model)
    model.eval()
    return {"steps": step, "train_seconds": time.perf_counter() - start}


def _save_checkpoint(path: Path, model, denoising, optimizer, scheduler, step: int, elapsed: float) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "elapsed": elapsed}
    if denoising is not None:
        state["denoising"] = denoising.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
