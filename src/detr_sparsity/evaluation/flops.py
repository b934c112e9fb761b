"""FLOPs of DETR: dense counts from torch.utils.flop_counter on the real model and inputs, and what a method
saves from the masks it actually applied (counted by the FFN wrappers), with its own overhead added back.

Convention, used in every output: FLOPs = 2 x multiply-accumulates, per image, averaged over the split.
FFN figures cover real tokens only (the counter's FFN counts are scaled by each block's real-token fraction,
exact because FFN work is linear in tokens); the rest of the model is counted as run on the padded batch.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from detr_sparsity.sparsity.ffn import FFNSparsity

log = logging.getLogger(__name__)

FLOPS_CONVENTION = "FLOPs = 2 x multiply-accumulates (torch.utils.flop_counter), per image"


class FlopCount:
    """Counts FLOPs of every module over the forward passes run inside it (`with count:`), or over the batches
    shown to `forward(pixel_values)`, each forward counted apart and the counts summed.

    On exit the counts are plain integers per module (`module_flops`), which shards of one evaluation sum
    exactly (evaluation.shards).

    FlopCounterMode sees every op in Python: a third of the detection time of an evaluation of the default study
    (0.8 of 2.7 s). A forward's counts follow from the shapes of its ops, which for the study's models and
    policies follow from the input's shape (a mask multiplies activations, it never shrinks a matmul), so
    `forward` counts each input shape twice under the mode and then adds those counts for every later batch of
    that shape. Where the two counts differ (an op whose shape follows the data), that shape is counted every time.
    """

    def __init__(self) -> None:
        self.mode: FlopCounterMode | None = None
        self.images = 0
        self.module_flops: dict[str, int] = {}
        # Per input shape: its first count, then (at the second) `confirmed` if equal, or None: count every time.
        self._first: dict[tuple[int, ...], dict[str, int] | None] = {}
        self._confirmed: dict[tuple[int, ...], dict[str, int]] = {}

    def __enter__(self) -> "FlopCount":
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        self._add(_per_module(self.mode))
        self.mode = None

    @contextmanager
    def forward(self, pixel_values: torch.Tensor, front_end_flops: int = 0) -> Iterator[None]:
        """Around one forward pass of the batch `pixel_values` (its images are counted too). A forward run from
        the front end's outputs (`evaluation.front_end`) gives the front end's FLOPs on the batch, counted where it
        ran, as `front_end_flops`: they join the whole model's count ('Global')."""
        shape = tuple(pixel_values.shape)
        self.images += shape[0]
        self._add({"Global": front_end_flops})
        if shape in self._confirmed:
            yield
            self._add(self._confirmed[shape])
            return
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        counts = _per_module(mode)
        self._add(counts)
        if shape not in self._first:
            self._first[shape] = counts
        elif self._first[shape] is not None:
            if self._first[shape] == counts:
                self._confirmed[shape] = counts
            else:
                self._first[shape] = None
                log.info("FLOPs of inputs of shape %s vary from batch to batch: counting every batch", shape)

    def _add(self, counts: dict[str, int]) -> None:
        for module, flops in counts.items():
            self.module_flops[module] = self.module_flops.get(module, 0) + flops

    def add_images(self, n: int) -> None:
        self.images += n

    def total(self) -> int:
        return self.module_flops.get("Global", 0)  # FlopCounterMode's name for the whole run

    def block(self, name: str) -> int:
        """Counted FLOPs of one FFN block's fc1 and fc2 ('encoder.0', ...), padding included.

        Only fc1 and fc2: whatever a policy itself runs inside the wrapper (a gate) is its overhead, added
        separately, so the dense figure is the same for every method.
        """
        kind, index = name.split(".")
        prefix = f".model.{kind}.layers.{index}.mlp.block."
        return sum(flops for module, flops in self.module_flops.items()
                   if module.endswith((prefix + "fc1", prefix + "fc2")))


def _per_module(mode: FlopCounterMode) -> dict[str, int]:
    return {module: int(sum(ops.values())) for module, ops in mode.get_flop_counts().items()}


def flops_per_image(count: FlopCount, sparsity: FFNSparsity) -> dict[str, dict[str, float]]:
    """{'ffn': {'dense', 'as_run'}, 'total': {'dense', 'as_run'}}, FLOPs per image.

    as_run = dense - 2 x (multiply-accumulates the masks skipped - those the policies added).
    """
    if count.images == 0:
        raise ValueError("no images were counted")
    counted_ffn = ffn_dense = saved = 0.0
    for name, block in sparsity.blocks.items():
        counted = count.block(name)
        counted_ffn += counted
        ffn_dense += counted * sparsity.real_token_fraction(name)
        saved += 2 * (block.skipped_macs() - block.overhead_macs())
    total_dense = count.total() - counted_ffn + ffn_dense
    n = count.images
    return {
        "ffn": {"dense": ffn_dense / n, "as_run": (ffn_dense - saved) / n},
        "total": {"dense": total_dense / n, "as_run": (total_dense - saved) / n},
    }
