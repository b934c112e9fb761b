"""Calibrating a gate set to its sparsity target on images it was not trained on.

The multiplier of an end-to-end training holds the training batches' open fraction near the budget, but
training ends wherever the last steps left it (measured with the task objective: 0.87 on the evaluation split
for a 0.90 target); the group_activity gates are trained with no target at all. So one offset on every gate's
logit (the same as one gate threshold for the whole set) is chosen by bisection such that the induced sparsity
of the gated blocks equals the target. It is measured through the gated model, so that upstream gates shape
downstream inputs as they will at evaluation. The stages calibrate on the study's calibration split (the split
the profile, SIBS and the threshold oracle read), so every method is set on the same images, none of them
trained on or evaluated. The offset is folded into the gate biases: the saved gates keep the configured gate
threshold.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import torch
from torch.utils.data import DataLoader
from transformers import DetrForObjectDetection, DetrImageProcessorPil

from detr_sparsity.data.dataset import CocoDetection, DetrCollate, Split
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.models.front_end import cached_front_end
from detr_sparsity.sparsity.ffn import sparse_ffns
from detr_sparsity.sparsity.policies import Policy

log = logging.getLogger(__name__)

FIRST_OFFSET = 4.0  # logits: the first bracket tried, doubled until it holds the target
OFFSET_LIMIT = 1e6  # logits: a gate set no offset this large moves is an error


def calibration_front_end(model: DetrForObjectDetection, split: Split, processor: DetrImageProcessorPil,
                          batch_size: int) -> FrontEndCache:
    """The front end of every image of the calibration split, computed once: each step of a bisection then runs
    only the transformer."""
    loader = DataLoader(CocoDetection(split), batch_size=batch_size,
                        collate_fn=DetrCollate(processor, with_labels=True))
    return build_front_end_cache(model, loader, total=len(loader))


@torch.no_grad()
def gated_sparsity(model: DetrForObjectDetection, gates: Mapping[str, MicroGate], cache: FrontEndCache,
                   index: list[int], batch_size: int) -> float:
    """Token-weighted induced sparsity of the gated blocks over the given cached images (real tokens only)."""
    with cached_front_end(model) as front, sparse_ffns(model, gates) as sparsity:
        for start in range(0, len(index), batch_size):
            batch = cache.batch(index[start:start + batch_size], model.device)
            model(**front.inputs(batch["features"], batch["mask"]))
        blocks = [sparsity.blocks[name] for name in gates]
        slots = sum(int(b.counts.tokens) * b.hidden for b in blocks)
        return 1.0 - sum(int(b.counts.kept) for b in blocks) / slots


def calibrate_gates(model: DetrForObjectDetection, gates: Mapping[str, MicroGate], cache: FrontEndCache,
                    index: list[int], target: float, batch_size: int, tolerance: float = 1e-3,
                    iterations: int = 20) -> dict[str, float]:
    """Shift every gate's bias by one offset so that the held-out induced sparsity is `target` (bisection)."""
    return _bisect(gates, lambda: gated_sparsity(model, gates, cache, index, batch_size), len(index), target,
                   tolerance, iterations)


class _InputRecorder(Policy):
    """Runs its block dense and keeps the block's input of every forward pass."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def mask(self, inputs: torch.Tensor, activations: torch.Tensor) -> None:
        self.inputs.append(inputs)
        return None


@torch.no_grad()
def dense_block_inputs(model: DetrForObjectDetection, name: str, cache: FrontEndCache, index: list[int],
                       batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Block `name`'s input on the given cached images with every block dense, batch by batch as `gated_sparsity`
    runs them, each with its real-token mask (None: every token real)."""
    recorder = _InputRecorder()
    recorded = []
    with cached_front_end(model) as front, sparse_ffns(model, {name: recorder}, counting=False) as sparsity:
        for start in range(0, len(index), batch_size):
            batch = cache.batch(index[start:start + batch_size], model.device)
            model(**front.inputs(batch["features"], batch["mask"]))
            real = sparsity.blocks[name].token_mask
            recorded.append((recorder.inputs.pop(), None if real is None else real.to(torch.bool)))
    return recorded


def calibrate_gate_alone(model: DetrForObjectDetection, name: str, gate: MicroGate, cache: FrontEndCache,
                         index: list[int], target: float, batch_size: int, tolerance: float = 1e-3,
                         iterations: int = 20) -> dict[str, float]:
    """`calibrate_gates` for the gate of block `name` alone, the other blocks dense: the block's input is then the
    dense model's whatever the gate does, so it is recorded once and each bisection step runs only the gate on it.
    The same inputs and operations as through the model, so the same offset."""
    inputs = dense_block_inputs(model, name, cache, index, batch_size)

    @torch.no_grad()
    def sparsity() -> float:
        kept = tokens = 0
        for block_input, real in inputs:  # counted as the FFN wrapper counts a gated block (sparsity.ffn)
            per_token = gate.open_groups(gate(block_input)).sum(dim=-1) * gate.group_size
            kept += int(per_token.sum() if real is None else (per_token * real).sum())
            tokens += per_token.numel() if real is None else int(real.sum())
        return 1.0 - kept / (tokens * gate.groups * gate.group_size)

    return _bisect({name: gate}, sparsity, len(index), target, tolerance, iterations)


def _bisect(gates: Mapping[str, MicroGate], measure: Callable[[], float], images: int, target: float,
            tolerance: float, iterations: int) -> dict[str, float]:
    """Shift every gate's bias by the one offset at which `measure()` (the gates' induced sparsity) is `target`."""
    for gate in gates.values():
        gate.eval()
    biases = {name: gate.gate.bias.detach().clone() for name, gate in gates.items()}

    def shift(offset: float) -> None:
        for name, gate in gates.items():
            gate.gate.bias.data = biases[name] - offset

    def sparsity_at(offset: float) -> float:
        shift(offset)
        return measure()

    start = time.perf_counter()
    before = sparsity_at(0.0)
    # Bracket the target first, doubling the offset: gates trained on labels that are nearly all 1
    # (group_activity) sit far above the threshold, beyond any fixed range (measured: 12 logits left a block at
    # 0.77 for a 0.95 target).
    direction = 1.0 if before < target else -1.0
    inner, outer = 0.0, direction * FIRST_OFFSET
    while (sparsity_at(outer) < target) == (direction > 0):
        if abs(outer) >= OFFSET_LIMIT:
            raise RuntimeError(f"no logit offset within ±{OFFSET_LIMIT:g} brings the gates' sparsity to {target} "
                               f"(from {before:.4f}): the gates do not respond to their bias")
        inner, outer = outer, 2 * outer
    low, high = sorted((inner, outer))
    offset, achieved = 0.0, before
    for _ in range(iterations):
        if abs(achieved - target) <= tolerance:
            break
        offset = (low + high) / 2
        achieved = sparsity_at(offset)
        low, high = (offset, high) if achieved < target else (low, offset)
    shift(offset)  # the last bisection step may have measured another offset
    log.info("calibrated on %d images: sparsity %.4f -> %.4f (target %.2f), logit offset %+.3f",
             images, before, achieved, target, offset)
    return {"images": images, "offset": offset, "sparsity_before": before, "sparsity_after": achieved,
            "seconds": time.perf_counter() - start}
