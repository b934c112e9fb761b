"""Policies: which hidden neurons of an FFN block each token computes (the mask m of y = fc2(m * relu(fc1 x))).

A policy only decides the mask; the wrapper in `sparsity.ffn` applies it and does all the counting. A
policy declares what deciding costs, so FLOPs stay honest:
- `reads_activations`: the mask is chosen from relu(fc1 x) itself (the top-k and threshold oracles), so fc1 must run in
  full and a skipped neuron saves only its fc2 column; otherwise it saves its fc1 row too.
- `overhead_macs_per_token`: work the policy adds per token (a gate's matmul), counted back into FLOPs.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping

import torch


class Policy:
    """Dense: every neuron of every token is computed (m = 1)."""

    name = "dense"
    reads_activations = False

    def mask(self, inputs: torch.Tensor, activations: torch.Tensor) -> torch.Tensor | None:
        """Boolean keep-mask broadcastable to `activations` (..., H), or None for all kept."""
        return None

    def overhead_macs_per_token(self, d_model: int, hidden: int) -> int:
        return 0

    def start_batch(self, image_ids: list[int]) -> None:
        """Called before each batch of an evaluation: a policy whose masks depend on draws keys them to it."""


Dense = Policy


def check_keep_ratio(keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio = {keep_ratio} is not allowed: must be in (0, 1]")
    return keep_ratio


def keep_count(keep_ratio: float, hidden: int) -> int:
    """k of H neurons kept per token for a keep-ratio: rounded, at least 1 (a ratio of 1.0 keeps all H)."""
    return max(1, min(hidden, round(check_keep_ratio(keep_ratio) * hidden)))


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)


class TopK(Policy):
    """Oracle: keep the k largest hidden activations of each token."""

    name = "topk"
    reads_activations = True

    def __init__(self, keep_ratio: float) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)

    def mask(self, inputs, activations):
        return _keep_top(activations, keep_count(self.keep_ratio, activations.shape[-1]))


class RandomKeep(Policy):
    """Keep k random hidden neurons of each token (seeded; the control for top-k at the same sparsity)."""

    name = "random"

    def __init__(self, keep_ratio: float, seed: int, block: str) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        # One stream per block, so a block's draws do not depend on which other blocks are masked.
        self.stream = seed * 1_000_003 + zlib.crc32(block.encode())
        self.generator = torch.Generator().manual_seed(self.stream)

    def start_batch(self, image_ids: list[int]) -> None:
        # Restarted per batch from the batch's first image, so a batch draws the same masks whether the split
        # runs in one job or in shards (evaluation.shards).
        if image_ids:
            self.generator.manual_seed(self.stream + 7_919 * int(image_ids[0]))

    def mask(self, inputs, activations):
        k = keep_count(self.keep_ratio, activations.shape[-1])
        scores = torch.rand(activations.shape, generator=self.generator).to(activations.device)
        return _keep_top(scores, k)


class StaticMask(Policy):
    """SIBS: one input-independent keep-mask over the H neurons, the same for every token."""

    name = "sibs"

    def __init__(self, keep: torch.Tensor) -> None:
        if keep.dtype != torch.bool or keep.dim() != 1:
            raise ValueError(f"a static mask is a 1-d boolean tensor over the hidden neurons, got {keep.dtype} "
                             f"of shape {tuple(keep.shape)}")
        self.keep = keep

    def mask(self, inputs, activations):
        if activations.shape[-1] != self.keep.numel():
            raise ValueError(f"static mask has {self.keep.numel()} neurons, the block has {activations.shape[-1]}")
        return self.keep.to(activations.device)


class Threshold(Policy):
    """Dynamic oracle (as CATS and TEAL): keep a token's hidden neuron when its activation exceeds the block's
    threshold t, so the number kept varies per token; t is calibrated to a target (`sparsity.thresholds`)."""

    name = "threshold"
    reads_activations = True

    def __init__(self, threshold: float) -> None:
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold = {threshold} is not allowed: must be a finite activation value >= 0")
        self.threshold = float(threshold)

    def mask(self, inputs, activations):
        return activations > self.threshold


MASKING_METHODS = ("topk", "random", "threshold")


def masking_policy(method: str, keep_ratio: float, seed: int, block: str,
                   thresholds: Mapping[str, float] | None = None) -> Policy:
    """The oracle analysis's policy (stage `masking`): keep the k largest, or k random, activations per token, or
    those above the block's threshold (`thresholds`, calibrated to induced sparsity 1 - keep_ratio)."""
    if method == "topk":
        return TopK(keep_ratio)
    if method == "random":
        return RandomKeep(keep_ratio, seed, block)
    if method == "threshold":
        check_keep_ratio(keep_ratio)
        if thresholds is None or block not in thresholds:
            raise ValueError(f"the threshold policy of block {block} needs its calibrated threshold "
                             "(sparsity.thresholds.calibrate_thresholds)")
        return Threshold(thresholds[block])
    raise ValueError(f"masking method {method!r} is not known; allowed: {', '.join(MASKING_METHODS)}")
