"""DETR run from its front end's outputs: the backbone and the input projection replaced, for the duration, by a
stand-in that returns a feature map computed earlier.

DETR's front end (backbone + input projection) sees only the images, so whatever runs the rest of the model many
times on the same images can compute it once: gate training and calibration from a cached training split
(`mgs.front_end`), and the passes of one evaluation job over its split (`evaluation.front_end`). Position
embeddings, masks, the encoder, the decoder and the heads are computed as usual from the feature map and its mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DetrForObjectDetection


class _CachedBackbone(nn.Module):
    """Stands in for DETR's backbone: returns the cached (already projected) feature map of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, pixel_values, pixel_mask):
        if self.batch is None:
            raise RuntimeError("no cached batch: build the model inputs with CachedFrontEnd.inputs first")
        return [self.batch]


class CachedFrontEnd:
    """`model(**front.inputs(features, mask), ...)` runs DETR from cached features."""

    def __init__(self, backbone: _CachedBackbone) -> None:
        self._backbone = backbone

    def inputs(self, features: torch.Tensor, mask: torch.Tensor,
               pixel_shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs for the batch whose projected feature map and mask are given. With the backbone
        replaced, DETR reads only the shape, device and dtype of pixel_values: a placeholder, of `pixel_shape`
        where given (the images' own, for whatever keys on it), that holds no memory."""
        self._backbone.batch = (features, mask)
        shape = pixel_shape or (features.shape[0], 3, 1, 1)
        placeholder = torch.zeros((), device=features.device, dtype=features.dtype).expand(shape)
        pixel_mask = torch.ones((), device=features.device, dtype=torch.long).expand(shape[0], *shape[2:])
        return {"pixel_values": placeholder, "pixel_mask": pixel_mask}


@contextmanager
def cached_front_end(model: DetrForObjectDetection) -> Iterator[CachedFrontEnd]:
    """Replace the backbone and input projection by the cache for the duration; restore them on exit.

    Enter it before `sparse_ffns`, whose encoder token mask is read from the (stand-in) backbone's output.
    """
    inner = model.model
    backbone, projection = inner.backbone, inner.input_projection
    stand_in = _CachedBackbone()
    inner.backbone, inner.input_projection = stand_in, nn.Identity()
    try:
        yield CachedFrontEnd(stand_in)
    finally:
        inner.backbone, inner.input_projection = backbone, projection
