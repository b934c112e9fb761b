"""The train split as pretraining reads it: every image decoded and resized by DETR's processor once, in both
orientations, and kept at the model's input size (uint8); a batch is then only stacked, rescaled, normalised and
padded, the arithmetic of DETR's processor done in torch.

Pretraining draws every image about ten times (5,000 steps of 16 over 8,000 images). Read, decoded, mirrored
and processed at every step, a batch took 30 ms of each 230-260 ms step, on the step's critical path; prepared once
(22 s for the 8,000 images, both orientations, on one thread; now on the job's threads) it takes 3 ms
(`benchmarks/train_images.py`, AVX-512 class). The inputs are the processor's own bit for bit: pixel values and
masks for any image sizes, labels too where a batch needs no padding (the default study's square images never do).
Where it does, DETR's processor scales a padded image's boxes to the batch's canvas and `visible_frame` scales them
back, which can move them by a rounding error; here they are the image's own, never scaled.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import DetrImageProcessorPil

from detr_sparsity.data.dataset import CocoDetection

log = logging.getLogger(__name__)


def is_flipped(seed: int, epoch: int, index: int) -> bool:
    """Whether pretraining mirrors image `index` in `epoch`: half of the draws, seeded per index and epoch, so a
    resumed run sees exactly the inputs an uninterrupted one would."""
    return random.Random(hash((seed, epoch, index))).random() >= 0.5


def mirrored(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    """The image mirrored left to right, its COCO boxes ([x, y, width, height]) with it."""
    width = image.width
    annotations = [{**a, "bbox": [width - a["bbox"][0] - a["bbox"][2], *a["bbox"][1:]]} for a in target["annotations"]]
    return image.transpose(Image.FLIP_LEFT_RIGHT), {**target, "annotations": annotations}


class TrainImages(Dataset):
    """The split's images prepared once, each mirrored or not as `is_flipped` says for the current `epoch`.

    An item is (resized image as uint8, channels first; labels; image id; original (h, w)); `collate` makes the
    batch DetrCollate(processor, with_labels=True) makes of the same images.
    """

    def __init__(self, dataset: CocoDetection, processor: DetrImageProcessorPil, seed: int) -> None:
        self.seed, self.epoch = seed, 0
        self.image_ids: list[int] = []
        self.orig_sizes: list[tuple[int, int]] = []
        self.prepared: list[tuple[tuple[torch.Tensor, dict], tuple[torch.Tensor, dict]]] = []
        # The processor's own resize; its rescale and normalisation are redone in `collate` (on uint8, 4x smaller).
        self._resize_only = dict(do_rescale=False, do_normalize=False, do_pad=False, return_tensors="pt")
        self._rescale = processor.rescale_factor
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(processor.image_std, dtype=torch.float32).view(-1, 1, 1)
        # On the job's threads: reading, decoding and resizing release the GIL for most of their time (the default
        # study's 8,000 images: 17.9 s on one thread, 14.9 s on two, the same images; AVX-512 class,
        # `benchmarks/train_image_threads.py`). Each image is prepared as alone, kept in the split's order.
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            for image_id, size, pair in pool.map(lambda index: self._prepare_both(processor, *dataset[index]),
                                                 range(len(dataset))):
                self.image_ids.append(image_id)
                self.orig_sizes.append(size)
                self.prepared.append(pair)
        held = sum(p.numel() for pair in self.prepared for p, _labels in pair)
        log.info("prepared %d train images in both orientations at the model's input size (%.0f MB)", len(self),
                 held / 2 ** 20)

    def _prepare_both(self, processor: DetrImageProcessorPil, image: Image.Image, target: dict):
        """The image's id, its original (h, w), and its prepared pair: as it is, mirrored."""
        return target["image_id"], (image.height, image.width), (self._prepare(processor, image, target),
                                                                  self._prepare(processor, *mirrored(image, target)))

    def _prepare(self, processor: DetrImageProcessorPil, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        encoded = processor(images=[image], annotations=[target], **self._resize_only)
        pixels = encoded["pixel_values"][0]
        if pixels.dtype != torch.uint8:
            raise RuntimeError(f"DETR's processor resized image {target['image_id']} to {pixels.dtype}, not uint8")
        labels = encoded["labels"][0]
        return pixels, {"class_labels": labels["class_labels"], "boxes": labels["boxes"]}

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict, int, tuple[int, int]]:
        pixels, labels = self.prepared[index][is_flipped(self.seed, self.epoch, index)]
        return pixels, labels, self.image_ids[index], self.orig_sizes[index]

    def collate(self, items: list[tuple[torch.Tensor, dict, int, tuple[int, int]]]) -> dict:
        """DETR's processor's arithmetic: uint8 to float64 times the rescale factor, to float32, minus the mean,
        over the std (float32); then zero padding at the bottom and right to the batch's largest size."""
        height = max(pixels.shape[1] for pixels, *_ in items)
        width = max(pixels.shape[2] for pixels, *_ in items)
        channels = items[0][0].shape[0]
        pixel_values = torch.zeros(len(items), channels, height, width, dtype=torch.float32)
        pixel_mask = torch.zeros(len(items), height, width, dtype=torch.int64)
        for row, (pixels, *_rest) in enumerate(items):
            _, h, w = pixels.shape
            scaled = (pixels.to(torch.float64) * self._rescale).to(torch.float32)
            pixel_values[row, :, :h, :w] = (scaled - self._mean) / self._std
            pixel_mask[row, :h, :w] = 1
        return {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "image_ids": [image_id for _p, _l, image_id, _s in items],
            "orig_sizes": torch.tensor([size for *_rest, size in items]),
            "labels": [{k: v.clone() for k, v in labels.items()} for _p, labels, _i, _s in items],
        }
