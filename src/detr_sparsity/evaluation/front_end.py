"""The evaluation split through DETR's front end, computed on a job's first pass and kept for its later ones.

An evaluation job may pass over its split several times with the same dense model (stage `masking`: every scope
of a point of the sweep; `mgs_single`: every block alone). Only the FFN blocks differ between those passes: the
images, their preparation (decoding, DETR's resize and padding) and the front end (backbone + input projection)
are the same every time. Every pass therefore runs DETR from the front end's outputs (`models.front_end`): the
first pass prepares each batch and runs the front end on it, keeping the projected feature map, its mask and the
batch's image ids and sizes; a later pass with the same model reads them instead, without the images. A split
whose front end would take more than `memory_bytes` (COCO's val2017 at DETR-R50's 800 x 1333: about 5 GB) keeps
nothing, and every pass prepares the images and runs the front end again, as one that keeps them does the first
time.

Exactness: each batch's front end is computed by the same modules on the same tensors as inside the full forward,
so the detections are those of the full forward bit for bit. The front end's FLOPs are counted where it runs
(torch.utils.flop_counter) and travel with its outputs: an evaluation's FLOP count adds them to the whole model's
for each batch it runs from them (`front_end_flops` of each batch, for `FlopCount.forward`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from transformers import DetrForObjectDetection

from detr_sparsity.models.front_end import CachedFrontEnd, cached_front_end

log = logging.getLogger(__name__)


@dataclass
class _FrontEndBatch:
    """One batch's front-end outputs and what detection needs of the batch besides its pixels."""

    features: torch.Tensor  # (B, d, h, w): projected feature map, on the host
    mask: torch.Tensor  # (B, h, w) bool: real positions of the feature map
    pixel_shape: tuple[int, ...]  # (B, 3, H, W) of the padded images
    flops: int  # of the front end on this batch
    meta: dict  # image_ids, orig_sizes, ...: every entry of the batch but its pixels

    def nbytes(self) -> int:
        return self.features.nbytes + self.mask.nbytes


class EvaluationFrontEnd:
    """The batches of `loader` as an evaluation pass runs them: `with front_end.serving(model) as batches`."""

    def __init__(self, loader: DataLoader, memory_bytes: int) -> None:
        self.loader = loader
        self.memory_bytes = memory_bytes
        self._kept: list[_FrontEndBatch] | None = None  # every batch's, once a whole pass has kept them
        self._model: DetrForObjectDetection | None = None  # the model they were computed with
        self._over_limit = False  # a pass found that they take more than memory_bytes: later passes keep none

    @contextmanager
    def serving(self, model: DetrForObjectDetection) -> Iterator[Iterator[dict]]:
        """The model runs from its front end's outputs for the duration (the backbone and input projection are
        stood in for, as `cached_front_end` does: enter this before `sparse_ffns`); the batches it yields hold
        placeholder pixels of the images' shape and `front_end_flops`. Iterate them one at a time, running the
        model on each before taking the next."""
        if self._model is not model:
            self._kept, self._model, self._over_limit = None, model, False
        backbone, projection = model.model.backbone, model.model.input_projection
        with cached_front_end(model) as front:
            yield self._batches(front, backbone, projection, model.device)

    def _batches(self, front: CachedFrontEnd, backbone, projection, device) -> Iterator[dict]:
        if self._kept is not None:
            for entry in self._kept:
                yield _served(front, entry, device)
            return
        kept: list[_FrontEndBatch] | None = [] if self.memory_bytes > 0 and not self._over_limit else None
        size = 0
        for batch in self.loader:
            entry = _computed(backbone, projection, batch, device)
            if kept is not None:
                size += entry.nbytes()
                if size > self.memory_bytes:
                    log.info("the front end of the %d batches of this split takes more than %d MB: every pass "
                             "runs it again", len(self.loader), self.memory_bytes // 2**20)
                    kept, self._over_limit = None, True
                else:
                    kept.append(entry)
            yield _served(front, entry, device)
        if kept is not None:  # a whole pass, not interrupted
            self._kept = kept


@torch.no_grad()
def _computed(backbone, projection, batch: dict, device) -> _FrontEndBatch:
    """The batch through the backbone and input projection, as DetrModel runs them, with their FLOPs."""
    pixel_values = batch["pixel_values"].to(device)
    with FlopCounterMode(display=False) as mode:
        feature_map, mask = backbone(pixel_values, batch["pixel_mask"].to(device))[-1]
        features = projection(feature_map)
    return _FrontEndBatch(features=features.cpu(), mask=mask.cpu(), pixel_shape=tuple(pixel_values.shape),
                          flops=int(mode.get_total_flops()),
                          meta={k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_mask")})


def _served(front: CachedFrontEnd, entry: _FrontEndBatch, device) -> dict:
    return {**entry.meta, **front.inputs(entry.features.to(device), entry.mask.to(device), entry.pixel_shape),
            "front_end_flops": entry.flops}
