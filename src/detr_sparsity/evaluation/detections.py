"""Run a DETR over a split and write COCO-format detections (DETR protocol: every query scored)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch
from tqdm import tqdm
from transformers import DetrForObjectDetection, DetrImageProcessorPil


@torch.no_grad()
def detect(
    model: DetrForObjectDetection,
    processor: DetrImageProcessorPil,
    batches: Iterable[dict],
    total: int | None = None,
    start_batch: Callable[[dict], None] | None = None,
    around_forward: Callable[[dict], ContextManager] | None = None,
) -> list[dict]:
    """COCO results [{image_id, category_id, bbox [x, y, w, h], score}] for every query of every image.

    No score threshold and no top-k: as in DETR's evaluation, each of the num_queries slots becomes one
    detection, labelled with its most likely real class, in the original image's pixel coordinates.
    Batches are moved to the model's device. `around_forward(batch)`, a context manager, encloses each batch's
    forward pass alone (the FLOP count).
    """
    model.eval()
    device = model.device
    results: list[dict] = []
    for batch in tqdm(batches, total=total, desc="detect", mininterval=10):
        if start_batch is not None:
            start_batch(batch)
        with nullcontext() if around_forward is None else around_forward(batch):
            outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
        # threshold=-1 keeps every query (scores are softmax probabilities, always > 0 anyway).
        per_image = processor.post_process_object_detection(outputs, threshold=-1.0,
                                                            target_sizes=batch["orig_sizes"].to(device))
        for image_id, found in zip(batch["image_ids"], per_image):
            for score, label, (x0, y0, x1, y1) in zip(found["scores"].tolist(), found["labels"].tolist(),
                                                       found["boxes"].tolist()):
                results.append({
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                    "score": round(score, 6),
                })
    return results
