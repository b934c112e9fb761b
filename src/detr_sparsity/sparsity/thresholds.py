"""Calibrating the `threshold` policy: per FFN block, the magnitude t on relu(fc1 x) whose induced sparsity on
the calibration split is a target (a neuron is skipped when its activation <= t, kept when > t).

t is the target-quantile of the block's post-ReLU activations over real tokens (every (token, neuron) value,
padding excluded): the smallest value v with share(activations <= v) >= target, numpy's `inverted_cdf` quantile.
When the target is at most the block's natural sparsity (its share of exact zeros), that value is 0: the policy
still skips every zero, so the sparsity it reaches is the natural sparsity, above the target. Each threshold is
returned with the sparsity it actually reaches on the calibration data.

Memory: the calibration split is not kept. One dense pass fills, per block, an exact histogram of the positive
activations over the top 20 bits of their float32 bit pattern (sign, always 0, dropped: 8 exponent bits and the 12
leading mantissa bits), and an exact count of the zeros. For non-negative floats the bit pattern orders as the
value, so each bin is an interval of values at most 2^-12 (0.024 %) of its value wide, and counts are exact and
independent of batch order. Bound: 2^20 int64 counts, 8 MiB per block whatever the split's size (DETR-R50's 12
blocks: 96 MiB). The threshold is the top edge of the bin holding the exact quantile, so
- it is at or above the exact quantile, by less than 2^-12 of it;
- the activations <= t are exactly those of the bins up to it, so the sparsity reported for the calibration data
  is exact (not estimated), and at least the target;
- it exceeds the target by at most one bin's share of the values (the values in the quantile's bin above it),
  negligible unless the activations pile up on a value.
A seeded subsample would bound memory too, but its quantile is off by a random rank error and the sparsity it
reaches on the whole calibration split would need a second pass; the histogram gives both in one pass, and the
same answer for any batching or sharding of the split.

Allocation (`masking.threshold_allocation`). `uniform`: every block at the target. `greedy`: the target is the
slot-weighted overall sparsity (tokens x H, as induced sparsity is counted), spread over the blocks where it costs
least, as `mgs.calibration: per_block` spreads the gates' (TEAL allocates across layers this way):
1. per block, a grid of thresholds at the sparsities GRID_STEP apart from its natural sparsity up (the histogram's
   exact quantiles), and a second dense pass over the same split that measures, at each, the relative error of
   the FFN output ||W2 (a * 1[a <= t])||^2 / ||fc2(a)||^2 summed over real tokens (a = relu(fc1 x));
2. the greedy walk of `mgs.allocation.greedy_allocation` over those grids to the first point at or above the
   target;
3. the overshoot of the last step taken back: of the blocks whose last step crossed the target, the one whose
   step bought sparsity most dearly moves to the exact sparsity that makes the overall one the target (its
   threshold again the histogram's quantile there), so the allocation lands on the target, not a grid step above.
The proxy reads dense activations (each block alone): upstream thresholds change downstream inputs, which is why
the evaluated sparsity is measured on val, not assumed. Single-block scopes keep the uniform threshold: a block
alone is the target in that block.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

# The greedy walk is the per-block calibration's own: one rule for gates and thresholds.
from detr_sparsity.mgs.allocation import BlockCosts, greedy_allocation
from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns

log = logging.getLogger(__name__)

DROPPED_BITS = 11  # of the 31 bits of a non-negative float32's pattern; 20 remain: 2^20 bins
BINS = 1 << (31 - DROPPED_BITS)
GRID_STEP = 0.01  # of a block's sparsity between the points of its allocation grid


@dataclass(frozen=True)
class BlockThreshold:
    """A block's calibrated threshold for one target, and what it does on the calibration data."""

    target: float  # the induced sparsity asked for
    threshold: float  # t: a neuron is kept when its activation > t (a float32 value)
    calibration_sparsity: float  # share of the block's real-token activations <= t on the calibration split
    natural_sparsity: float  # share of exact zeros there: the least any threshold skips

    def as_setting(self) -> dict:
        return {"threshold": self.threshold, "calibration_sparsity": self.calibration_sparsity,
                "natural_sparsity": self.natural_sparsity}


def bin_top(index: int) -> float:
    """The largest float32 value in histogram bin `index` (as a Python float, exactly)."""
    pattern = ((index + 1) << DROPPED_BITS) - 1
    return torch.tensor([pattern], dtype=torch.int32).view(torch.float32).item()


def check_target(target: float) -> float:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"an induced-sparsity target of {target} is not allowed: must be in [0, 1)")
    return float(target)


class ActivationHistogram:
    """An observer of the FFN wrappers: per block, the exact zero count and the histogram of positive
    activations over real tokens (see the module's docstring)."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}  # (BINS,) int64, on the model's device
        self.zeros: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}  # every real-token value seen, zero, positive or not a number

    def __call__(self, name: str, activations: torch.Tensor, real: torch.Tensor | None,
                 nonzero: torch.Tensor) -> None:
        values = activations.reshape(-1, activations.shape[-1]) if real is None else activations[real]
        values = values.float()  # exact for any narrower float; the bins are float32 patterns
        positive = values[values > 0]
        bins = torch.bincount(positive.view(torch.int32) >> DROPPED_BITS, minlength=BINS)
        if name not in self.counts:
            device = activations.device
            self.counts[name] = torch.zeros(BINS, dtype=torch.int64, device=device)
            self.zeros[name] = torch.zeros((), dtype=torch.int64, device=device)
            self.values[name] = torch.zeros((), dtype=torch.int64, device=device)
        self.counts[name] += bins
        self.zeros[name] += (values == 0).sum()
        self.values[name] += values.numel()

    def blocks(self) -> list[str]:
        return sorted(self.counts, key=block_order)

    def thresholds(self, name: str, targets: Iterable[float]) -> dict[float, BlockThreshold]:
        """The block's threshold for each target (see the module's docstring)."""
        counts = self.counts[name].cpu()
        zeros, total = int(self.zeros[name]), int(self.values[name])
        if total == 0:
            raise ValueError(f"FFN block {name}: no real-token activations were seen; nothing to calibrate on")
        cumulative = counts.cumsum(0)
        positive = int(cumulative[-1])
        if zeros + positive != total:
            raise ValueError(f"FFN block {name}: {total - zeros - positive} of {total} activations are not a number "
                             "(NaN); no threshold can be calibrated")
        found = {}
        for target in targets:
            # numpy's inverted_cdf: the ceil(target x total)-th smallest value (1-based), 0 for a target of 0
            rank = math.ceil(check_target(target) * total)
            if rank <= zeros:
                threshold, at_most = 0.0, zeros
            else:
                index = int(torch.searchsorted(cumulative, rank - zeros))
                threshold, at_most = bin_top(index), zeros + int(cumulative[index])
                if not math.isfinite(threshold):
                    raise ValueError(f"FFN block {name}: the {target} quantile of its activations is not finite")
            found[target] = BlockThreshold(target, threshold, at_most / total, zeros / total)
        return found


@torch.no_grad()
def dense_pass(model, loader, observer, total: int | None = None, desc: str = "threshold calibration") -> None:
    """One dense pass of `model` over `loader` (a calibration split's batches, DETR's padding and pixel masks),
    `observer` seeing every block's activations."""
    with sparse_ffns(model) as sparsity:
        sparsity.add_observer(observer)
        for batch in tqdm(loader, total=total, desc=desc, mininterval=10):
            model(pixel_values=batch["pixel_values"].to(model.device), pixel_mask=batch["pixel_mask"].to(model.device))


def activation_histogram(model, loader, total: int | None = None) -> ActivationHistogram:
    histogram = ActivationHistogram()
    dense_pass(model, loader, histogram, total)
    return histogram


def calibrate_thresholds(model, loader, targets: Iterable[float], total: int | None = None
                         ) -> dict[str, dict[float, BlockThreshold]]:
    """Per block, per target, the threshold whose induced sparsity on the images of `loader` is the target (at
    least): one dense pass."""
    targets = [check_target(t) for t in targets]
    histogram = activation_histogram(model, loader, total)
    return {name: histogram.thresholds(name, targets) for name in histogram.blocks()}


class OutputError:
    """An observer of the FFN wrappers: per block, the FFN-output energy ||fc2(a)||^2 and, for each threshold of the
    block's grid, the error ||W2 (a * 1[a <= t])||^2 of skipping the activations at or below it (real tokens)."""

    def __init__(self, blocks: Mapping[str, nn.Module], grids: Mapping[str, list[float]]) -> None:
        self.fc2 = {name: blocks[name].fc2 for name in grids}
        self.grids = {name: list(grid) for name, grid in grids.items()}
        self.energy = {name: torch.zeros((), dtype=torch.float64) for name in grids}
        self.error = {name: torch.zeros(len(grid), dtype=torch.float64) for name, grid in grids.items()}

    @torch.no_grad()
    def __call__(self, name: str, activations: torch.Tensor, real: torch.Tensor | None,
                 nonzero: torch.Tensor) -> None:
        if name not in self.grids:
            return
        a = activations.reshape(-1, activations.shape[-1]) if real is None else activations[real]
        fc2 = self.fc2[name]
        self.energy[name] += fc2(a).double().square().sum().cpu()
        for j, threshold in enumerate(self.grids[name]):
            # fc2(m a) - fc2(a) = -W2 ((1 - m) a): the bias cancels, and no difference of near-equal outputs.
            dropped = a * (a <= threshold)
            self.error[name][j] += nn.functional.linear(dropped, fc2.weight).double().square().sum().cpu()

    def costs(self, name: str) -> list[float]:
        energy = float(self.energy[name])
        return (self.error[name] / energy).tolist() if energy > 0 else [0.0] * len(self.grids[name])


def grid_levels(natural: float) -> list[float]:
    """A block's grid: its natural sparsity (threshold 0), then every multiple of GRID_STEP above it below 1."""
    steps = round(1 / GRID_STEP)
    return [0.0, *(i / steps for i in range(1, steps) if i / steps > natural)]


def allocate_thresholds(model, loader, target: float, total: int | None = None
                        ) -> tuple[dict[str, BlockThreshold], dict[str, BlockThreshold], dict]:
    """The uniform thresholds at `target` and the greedily allocated ones (see the module's docstring), from two
    dense passes over `loader`. The record: per block the allocated sparsity, and the grid point the greedy walk
    stopped at with its proxy cost; the allocated overall sparsity on the calibration data (exact)."""
    start = time.perf_counter()
    target = check_target(target)
    histogram = activation_histogram(model, loader, total)
    names = histogram.blocks()
    uniform = {name: histogram.thresholds(name, [target])[target] for name in names}
    grids = {}
    for name in names:
        found = histogram.thresholds(name, grid_levels(uniform[name].natural_sparsity))
        points = sorted(found.values(), key=lambda b: b.target)
        # Only points that add sparsity (several levels can fall in one bin): the grid rises strictly.
        grids[name] = [b for i, b in enumerate(points)
                       if i == 0 or b.calibration_sparsity > points[i - 1].calibration_sparsity]
    error = OutputError(ffn_blocks(model), {name: [b.threshold for b in grid] for name, grid in grids.items()})
    dense_pass(model, loader, error, total, desc="threshold allocation")
    hidden = {name: ffn_blocks(model)[name].fc1.out_features for name in names}
    costs = {name: BlockCosts(offsets=[b.threshold for b in grids[name]],  # the grid's knob: the threshold
                              sparsity=[b.calibration_sparsity for b in grids[name]], cost=error.costs(name),
                              tokens=int(histogram.values[name]) // hidden[name], hidden=hidden[name])
             for name in names}
    point = greedy_allocation(costs, target)
    allocated = {name: grids[name][point[name]] for name in names}
    record = {"blocks": {name: {"grid_sparsity": allocated[name].calibration_sparsity,
                                "grid_cost": costs[name].cost[point[name]]} for name in names}}
    slots = {name: int(histogram.values[name]) for name in names}
    total_slots = sum(slots.values())

    def overall() -> float:
        return sum(slots[n] * allocated[n].calibration_sparsity for n in names) / total_slots

    # Take back the overshoot of the last step: among the blocks whose last step crossed the target, the one whose
    # step cost most per unit of overall sparsity (the first in block order on a tie) lands where the overall
    # sparsity is the target.
    crossed = []
    for name in names:
        j = point[name]
        if j == 0:
            continue
        step = slots[name] * (grids[name][j].calibration_sparsity - grids[name][j - 1].calibration_sparsity)
        if overall() - step / total_slots < target:
            crossed.append((name, (costs[name].cost[j] - costs[name].cost[j - 1]) * total_slots / step))
    if crossed and overall() > target:
        name, _ = max(crossed, key=lambda c: c[1])
        rest = overall() * total_slots - slots[name] * allocated[name].calibration_sparsity
        level = (target * total_slots - rest) / slots[name]
        allocated[name] = histogram.thresholds(name, [level])[level]
    for name in names:
        record["blocks"][name]["sparsity"] = allocated[name].calibration_sparsity
    record["allocated_sparsity"] = overall()
    # Seconds are logged, not recorded: shard jobs attach this record and must agree on it.
    log.info("threshold allocation toward %.3g (calibration sparsity %.4f, %.1f s): %s", target,
             record["allocated_sparsity"], time.perf_counter() - start,
             ", ".join(f"{n} {allocated[n].calibration_sparsity:.3f}" for n in names))
    return uniform, allocated, record
