"""The physically shrunk FFN: a static keep-mask (SIBS) turned into smaller dense matrices.

Removing row n of fc1 (and its bias) and column n of fc2 computes exactly what masking neuron n computes,
without the work: relu(fc1 x)_n * 0 contributes nothing to fc2's output.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.sparsity.ffn import SparseFFN, ffn_blocks


@torch.no_grad()
def shrink_linear_pair(fc1: nn.Linear, fc2: nn.Linear, keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """fc1 restricted to the kept output rows, fc2 to the matching input columns."""
    index = keep.nonzero().flatten().to(fc1.weight.device)
    small1 = nn.Linear(fc1.in_features, index.numel(), device=fc1.weight.device, dtype=fc1.weight.dtype)
    small2 = nn.Linear(index.numel(), fc2.out_features, device=fc2.weight.device, dtype=fc2.weight.dtype)
    small1.weight.copy_(fc1.weight[index])
    small1.bias.copy_(fc1.bias[index])
    small2.weight.copy_(fc2.weight[:, index])
    small2.bias.copy_(fc2.bias)
    return small1, small2


def shrink_ffns(model: DetrForObjectDetection, keep_masks: Mapping[str, torch.Tensor]) -> DetrForObjectDetection:
    """Shrink the named FFN blocks of `model` in place (use a copy to keep the original); returns it."""
    blocks = ffn_blocks(model)
    for name, keep in keep_masks.items():
        block = blocks[name]
        if isinstance(block, SparseFFN):
            raise RuntimeError(f"FFN block {name} is wrapped; shrink the plain model")
        if keep.numel() != block.fc1.out_features:
            raise ValueError(f"keep-mask of {name} has {keep.numel()} neurons, the block has {block.fc1.out_features}")
        block.fc1, block.fc2 = shrink_linear_pair(block.fc1, block.fc2, keep)
    return model
