"""COCO-format detection dataset and the collate function that turns it into DETR inputs.

The same code serves the synthetic study and COCO: a split is an `instances_*.json` plus an image
directory, as listed in the data stage's manifest (`splits.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import DetrImageProcessorPil

from detr_sparsity.config import InputSize

MANIFEST = "splits.json"


@dataclass(frozen=True)
class Split:
    """One split on disk: its COCO annotation file and its image directory."""

    name: str
    annotations: Path
    images: Path


def load_split(data_dir: str | Path, split: str) -> Split:
    """Find a split in the data stage's output via its manifest."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / MANIFEST).read_text())
    if split not in manifest:
        raise KeyError(f"split {split!r} not in {data_dir / MANIFEST}; available: {', '.join(manifest)}")
    entry = manifest[split]
    # Relative entries are relative to the data directory; absolute ones point at a local COCO root.
    return Split(split, data_dir / entry["annotations"], data_dir / entry["images"])


class CocoDetection(Dataset):
    """Images with their COCO annotations, in the order of the annotation file."""

    def __init__(self, split: Split):
        self.split = split
        instances = json.loads(split.annotations.read_text())
        self.images = instances["images"]
        self.categories = instances["categories"]
        by_image: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in instances["annotations"]:
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, dict]:
        info = self.images[index]
        image = Image.open(self.split.images / info["file_name"]).convert("RGB")
        return image, {"image_id": info["id"], "annotations": self.annotations[info["id"]]}


def image_processor(size: InputSize) -> DetrImageProcessorPil:
    """DETR's own preprocessing: resize (shortest/longest edge), ImageNet normalisation, padding + mask."""
    return DetrImageProcessorPil(size={"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge})


class DetrCollate:
    """Batch of (image, target) -> pixel_values, pixel_mask, labels, and original sizes (h, w)."""

    def __init__(self, processor: DetrImageProcessorPil, with_labels: bool):
        self.processor = processor
        self.with_labels = with_labels

    def __call__(self, batch: list[tuple[Image.Image, dict]]) -> dict:
        images, targets = zip(*batch)
        encoded = self.processor(
            images=list(images),
            annotations=list(targets) if self.with_labels else None,
            return_tensors="pt",
        )
        out = {
            "pixel_values": encoded["pixel_values"],
            "pixel_mask": encoded["pixel_mask"],
            "image_ids": [t["image_id"] for t in targets],
            "orig_sizes": torch.tensor([[img.height, img.width] for img in images]),
        }
        if self.with_labels:
            out["labels"] = [{"class_labels": lab["class_labels"], "boxes": visible_frame(lab["boxes"], mask)}
                             for lab, mask in zip(encoded["labels"], encoded["pixel_mask"])]
        return out


def visible_frame(boxes: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) boxes relative to the image's own (resized, unpadded) extent.

    The image processor normalises a padded image's label boxes to the padded canvas of the batch, but DETR
    predicts boxes relative to the visible image (as the original DETR trains it, and as the pretrained
    DETR-R50 and post_process_object_detection, hence `detect`, assume). An unpadded image is left exactly as is.
    """
    canvas_h, canvas_w = pixel_mask.shape
    visible_h = int(pixel_mask.any(dim=1).sum())
    visible_w = int(pixel_mask.any(dim=0).sum())
    if (visible_h, visible_w) == (canvas_h, canvas_w):
        return boxes
    scale = torch.tensor([canvas_w / visible_w, canvas_h / visible_h] * 2, dtype=boxes.dtype)
    return boxes * scale
