"""The frozen front end of DETR (backbone + input projection), computed once per training image and reused.

Gate training never changes the dense model, so the projected feature map of each training image is the
same at every step and for every sparsity target; so are the dense model's own outputs, which the
distillation objective learns from. `build_front_end_cache` computes both once (stage `mgs_cache`);
`models.front_end.cached_front_end` makes the model read them through DETR's own forward (position embeddings, masks and
the loss are computed as usual from the cached feature map and its mask).

Each image's feature map is stored cropped to its real (unpadded) region, as DETR pads at the bottom and
right; a training batch pads the crops again to the batch's largest one. Padded positions are masked out
of attention and the sine position embedding is normalised by the real extent, so real tokens see what
they would in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import atomic_path


@dataclass
class FrontEndCache:
    """Per image: real region of the projected feature map, ground-truth labels, the dense model's outputs."""

    features: torch.Tensor  # (tokens of all images, d), each image's real region in row-major order
    shapes: torch.Tensor  # (N, 2) rows and columns of each image's real region
    label_classes: torch.Tensor  # (boxes of all images,)
    label_boxes: torch.Tensor  # (boxes of all images, 4), normalised (cx, cy, w, h) as DETR's loss wants
    label_counts: torch.Tensor  # (N,)
    teacher_logits: torch.Tensor  # (N, queries, classes + 1) of the dense model
    teacher_boxes: torch.Tensor  # (N, queries, 4)

    def __post_init__(self) -> None:
        zero = torch.zeros(1, dtype=torch.int64)
        self._token_start = torch.cat([zero, (self.shapes[:, 0] * self.shapes[:, 1]).cumsum(0)])
        self._label_start = torch.cat([zero, self.label_counts.cumsum(0)])

    def __len__(self) -> int:
        return self.shapes.shape[0]

    def batch(self, index: list[int], device: torch.device | str = "cpu") -> dict:
        """A training batch on `device`: padded feature maps (B, d, h, w), their mask, labels and the teacher's
        outputs. The cache itself stays in host memory (COCO's is larger than a GPU's)."""
        d = self.features.shape[1]
        h, w = (int(v) for v in self.shapes[index].max(0).values)
        features = torch.zeros(len(index), d, h, w, dtype=self.features.dtype)
        mask = torch.zeros(len(index), h, w, dtype=torch.bool)
        labels = []
        for row, i in enumerate(index):
            rh, rw = (int(v) for v in self.shapes[i])
            tokens = self.features[self._token_start[i]:self._token_start[i + 1]]
            features[row, :, :rh, :rw] = tokens.T.reshape(d, rh, rw)
            mask[row, :rh, :rw] = True
            a, b = self._label_start[i], self._label_start[i + 1]
            labels.append({"class_labels": self.label_classes[a:b].to(device),
                           "boxes": self.label_boxes[a:b].to(device)})
        return {"features": features.to(device), "mask": mask.to(device), "labels": labels,
                "teacher_logits": self.teacher_logits[index].to(device),
                "teacher_boxes": self.teacher_boxes[index].to(device)}

    def save(self, path: str | Path) -> None:
        tensors = {k: getattr(self, k).contiguous() for k in self.__dataclass_fields__}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "FrontEndCache":
        return cls(**load_file(str(path)))


def _real_region(mask: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of the real region of one (h, w) feature mask; it must be a top-left rectangle."""
    rows, cols = int(mask[:, 0].sum()), int(mask[0, :].sum())
    if not mask[:rows, :cols].all() or mask.sum() != rows * cols:
        raise ValueError("the feature mask is not a top-left rectangle; DETR pads images at the bottom and right")
    return rows, cols


@torch.no_grad()
def build_front_end_cache(model: DetrForObjectDetection, batches: Iterable[dict], total: int | None = None
                          ) -> FrontEndCache:
    """One dense forward per batch (with labels from the collate), keeping the projected features it used (in
    host memory, whatever the model's device)."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.model.backbone.register_forward_hook(
                 lambda _m, _i, out: captured.update(mask=out[-1][1])),
             model.model.input_projection.register_forward_hook(
                 lambda _m, _i, out: captured.update(features=out))]
    features, shapes, classes, boxes, counts, logits, pred_boxes = [], [], [], [], [], [], []
    try:
        for batch in tqdm(batches, total=total, desc="front end", mininterval=10):
            out = model(pixel_values=batch["pixel_values"].to(model.device),
                        pixel_mask=batch["pixel_mask"].to(model.device))
            for feature_map, mask, labels in zip(captured["features"].cpu(), captured["mask"].cpu(), batch["labels"]):
                rows, cols = _real_region(mask)
                features.append(feature_map[:, :rows, :cols].flatten(1).T)
                shapes.append((rows, cols))
                classes.append(labels["class_labels"])
                boxes.append(labels["boxes"].reshape(-1, 4))
                counts.append(len(labels["class_labels"]))
            logits.append(out.logits.cpu())
            pred_boxes.append(out.pred_boxes.cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return FrontEndCache(features=torch.cat(features), shapes=torch.tensor(shapes, dtype=torch.int64),
                         label_classes=torch.cat(classes).to(torch.int64), label_boxes=torch.cat(boxes),
                         label_counts=torch.tensor(counts, dtype=torch.int64),
                         teacher_logits=torch.cat(logits), teacher_boxes=torch.cat(pred_boxes))
