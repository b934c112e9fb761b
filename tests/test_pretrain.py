"""Pretraining of the small DETR: it resumes exactly after an interruption, it saves a standard DETR, and the
images it trains on, prepared once, are what DETR's processor makes of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from detr_sparsity.config import InputSize
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split, verify_splits
from detr_sparsity.data.train_images import TrainImages, is_flipped
from detr_sparsity.data.synthetic import SyntheticSpec, generate_synthetic
from detr_sparsity.atomic import write_json
from detr_sparsity.models.pretrain import pretrain
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from tiny_project import TINY

ARCH = TINY["model"]["architecture"]


@pytest.fixture(scope="module")
def train_split(tmp_path_factory) -> CocoDetection:
    root = tmp_path_factory.mktemp("data")
    manifest = generate_synthetic(root, {"train": 12}, SyntheticSpec(num_images=0, image_size=96, max_objects=4), 0)
    write_json(root / "splits.json", verify_splits(root, manifest))
    return CocoDetection(load_split(root, "train"))


def _settings(steps: int, denoising_groups: int) -> dict:
    pretrain_settings = TINY["model"]["pretrain"]
    return {**pretrain_settings, "steps": steps, "checkpoint_every": 2,
            "denoising": {**pretrain_settings["denoising"], "groups": denoising_groups}}


def _train(train_split, checkpoint: Path, steps: int, stop_at: int | None = None, denoising_groups: int = 0):
    torch.manual_seed(0)
    model = build_small_detr(small_detr_config(ARCH, train_split.categories))
    losses = {}

    def log_step(step, metrics):
        losses[step] = metrics["loss"]
        if step == stop_at:
            raise KeyboardInterrupt  # what an interrupted job looks like to the loop

    pretrain(model, train_split, image_processor(InputSize(64, 64)), _settings(steps, denoising_groups), 0, checkpoint,
             log_step)
    return model, losses


@pytest.mark.parametrize("denoising_groups", [0, 2])
def test_interrupted_pretraining_resumes_to_the_same_weights(train_split, tmp_path, denoising_groups):
    """With denoising queries too: their parameters and noise draws resume with the model."""
    reference, reference_losses = _train(train_split, tmp_path / "a.pt", steps=5, denoising_groups=denoising_groups)

    checkpoint = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(train_split, checkpoint, steps=5, stop_at=3, denoising_groups=denoising_groups)
    assert checkpoint.exists()  # written at step 2, before the interruption
    resumed, resumed_losses = _train(train_split, checkpoint, steps=5, denoising_groups=denoising_groups)

    assert sorted(resumed_losses) == [3, 4, 5]  # steps 1-2 came from the checkpoint
    assert resumed_losses == {s: reference_losses[s] for s in (3, 4, 5)}
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("denoising_groups", [0, 2])
def test_pretrained_model_is_a_standard_detr(train_split, tmp_path, denoising_groups):
    """Denoising queries train beside the model but leave nothing in it: the same parameters as a fresh DETR's."""
    model, losses = _train(train_split, tmp_path / "c.pt", steps=3, denoising_groups=denoising_groups)
    fresh = build_small_detr(small_detr_config(ARCH, train_split.categories))
    assert type(model) is type(fresh) and model.state_dict().keys() == fresh.state_dict().keys()
    assert not model.training
    norms = [m for m in model.model.backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, DetrFrozenBatchNorm2d) for m in norms)
    # Batch statistics were learned during pretraining and carried into the frozen norms.
    assert any(not torch.all(m.running_var == 1) for m in norms)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


# =========================================================================================================
# The train images, prepared once


def _mirrored_here(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    """Mirrored left to right, written out again here: x of a box of width w in an image of width W is W - x - w."""
    flipped = image.transpose(Image.FLIP_LEFT_RIGHT)
    anns = [{**a, "bbox": [image.width - a["bbox"][0] - a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in target["annotations"]]
    return flipped, {**target, "annotations": anns}


def _processors_batch(collate: DetrCollate, dataset, seed: int, epoch: int) -> dict:
    """What DETR's processor makes of the images, each mirrored in the draws `is_flipped` names."""
    return collate([_mirrored_here(*dataset[i]) if is_flipped(seed, epoch, i) else dataset[i]
                    for i in range(len(dataset))])


@pytest.mark.parametrize("threads", [1, 3])
def test_prepared_train_batches_are_detr_processors_own_bit_for_bit(train_split, threads):
    """Two epochs of the 12 square images (some mirrored in each, not the same ones): pixel values, masks, labels
    and sizes identical to DETR's processor on each image read, decoded and mirrored for the batch, whether the
    images are prepared on one thread or on several (the job's torch threads)."""
    processor = image_processor(InputSize(64, 64))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prepared = TrainImages(train_split, processor, seed=3)
    finally:
        torch.set_num_threads(before)
    collate = DetrCollate(processor, with_labels=True)
    flips = {epoch: [is_flipped(3, epoch, i) for i in range(len(train_split))] for epoch in (0, 1)}
    assert all(0 < sum(f) < len(f) for f in flips.values()) and flips[0] != flips[1]
    for epoch in (0, 1):
        prepared.epoch = epoch
        ours = prepared.collate([prepared[i] for i in range(len(prepared))])
        reference = _processors_batch(collate, train_split, 3, epoch)
        assert ours["pixel_values"].dtype == reference["pixel_values"].dtype == torch.float32
        for key in ("pixel_values", "pixel_mask", "orig_sizes"):
            assert torch.equal(ours[key], reference[key]), key
        assert ours["image_ids"] == reference["image_ids"]
        for a, b in zip(ours["labels"], reference["labels"], strict=True):
            assert torch.equal(a["class_labels"], b["class_labels"]) and torch.equal(a["boxes"], b["boxes"])


class _MixedSizes:
    """Three images of different shapes, one box each, so that a batch of them is padded."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for image_id, (height, width) in enumerate([(96, 96), (80, 120), (120, 64)]):
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
            box = [width * 0.1, height * 0.2, width * 0.5, height * 0.3]
            target = {"image_id": image_id, "annotations": [
                {"id": image_id, "image_id": image_id, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                 "iscrowd": 0}]}
            self.items.append((Image.fromarray(pixels.numpy()), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_prepared_train_batches_of_mixed_sizes_are_padded_as_detr_processor_pads():
    """Padded batches: pixel values and masks bit for bit; boxes within a rounding error (the processor scales a
    padded image's boxes to the canvas and `visible_frame` scales them back)."""
    dataset = _MixedSizes()
    processor = image_processor(InputSize(64, 128))
    prepared = TrainImages(dataset, processor, seed=0)
    for epoch in (0, 1, 2):
        prepared.epoch = epoch
        ours = prepared.collate([prepared[i] for i in range(len(prepared))])
        reference = _processors_batch(DetrCollate(processor, with_labels=True), dataset, 0, epoch)
        assert ours["pixel_mask"].sum() < ours["pixel_mask"].numel()  # padded
        assert torch.equal(ours["pixel_values"], reference["pixel_values"])
        assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])
        for a, b in zip(ours["labels"], reference["labels"], strict=True):
            assert torch.equal(a["class_labels"], b["class_labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-6)
