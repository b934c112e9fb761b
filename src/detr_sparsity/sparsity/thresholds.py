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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm import tqdm

from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import sparse_ffns

DROPPED_BITS = 11  # of the 31 bits of a non-negative float32's pattern; 20 remain: 2^20 bins
BINS = 1 << (31 - DROPPED_BITS)


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
def calibrate_thresholds(model, loader, targets: Iterable[float], total: int | None = None
                         ) -> dict[str, dict[float, BlockThreshold]]:
    """One dense pass of `model` over `loader` (a calibration split's batches, DETR's padding and pixel masks):
    per block, per target, the threshold whose induced sparsity on those images is the target (at least)."""
    targets = [check_target(t) for t in targets]
    histogram = ActivationHistogram()
    with sparse_ffns(model) as sparsity:
        sparsity.add_observer(histogram)
        for batch in tqdm(loader, total=total, desc="threshold calibration", mininterval=10):
            model(pixel_values=batch["pixel_values"].to(model.device), pixel_mask=batch["pixel_mask"].to(model.device))
    return {name: histogram.thresholds(name, targets) for name in histogram.blocks()}
