"""Natural activation sparsity of DETR's FFN blocks: the fraction of post-ReLU hidden values equal to zero.

Counted token-weighted per block over real tokens only: encoder tokens that fall on padding (images of a
batch are padded to one size) are excluded, using the same downsampled pixel mask DETR itself uses.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import DetrForObjectDetection


def ffn_blocks(model: DetrForObjectDetection) -> dict[str, torch.nn.Module]:
    """Every FFN block (DetrMLP: fc1 -> ReLU -> fc2), named 'encoder.<i>' / 'decoder.<i>'."""
    inner = model.model
    blocks = {f"encoder.{i}": layer.mlp for i, layer in enumerate(inner.encoder.layers)}
    blocks.update({f"decoder.{i}": layer.mlp for i, layer in enumerate(inner.decoder.layers)})
    return blocks


class NaturalSparsityCounter:
    """Accumulates zero and total counts of post-ReLU FFN activations across forward passes."""

    def __init__(self) -> None:
        self.zeros: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self._token_mask: torch.Tensor | None = None

    @contextmanager
    def attach(self, model: DetrForObjectDetection) -> Iterator["NaturalSparsityCounter"]:
        """Count while inside the block; the hooks are removed on exit, leaving the model as it was."""
        handles = [model.model.backbone.register_forward_hook(self._remember_mask)]
        for name, block in ffn_blocks(model).items():
            handles.append(block.fc1.register_forward_hook(self._counter(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _remember_mask(self, _module, _inputs, features) -> None:
        # The transformer reads the last feature map; its mask marks real (not padded) positions.
        _feature_map, mask = features[-1]
        self._token_mask = mask.flatten(1)

    def _counter(self, name: str):
        def hook(_module, _inputs, pre_activation: torch.Tensor) -> None:
            fired = pre_activation > 0  # relu(z) == 0 exactly when z <= 0
            if name.startswith("encoder") and self._token_mask is not None:
                real = self._token_mask.to(fired.device)
                self.zeros[name] += int((~fired & real[..., None]).sum())
                self.total[name] += int(real.sum()) * fired.shape[-1]
            else:
                self.zeros[name] += int((~fired).sum())
                self.total[name] += fired.numel()
        return hook

    def summary(self) -> dict:
        """{'overall', 'encoder', 'decoder', 'per_block': {name: fraction}}, all token-weighted."""
        def fraction(names: list[str]) -> float | None:
            total = sum(self.total[n] for n in names)
            return sum(self.zeros[n] for n in names) / total if total else None

        names = sorted(self.total, key=lambda n: (n.split(".")[0], int(n.split(".")[1])))
        return {
            "overall": fraction(names),
            "encoder": fraction([n for n in names if n.startswith("encoder")]),
            "decoder": fraction([n for n in names if n.startswith("decoder")]),
            "per_block": {n: fraction([n]) for n in names},
        }
