"""Pretraining of the small DETR: it learns, it resumes exactly after an interruption, and it saves a standard DETR."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from detr_sparsity.config import InputSize
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split, verify_splits
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


def _settings(steps: int) -> dict:
    return {**TINY["model"]["pretrain"], "steps": steps, "checkpoint_every": 2}


def _train(train_split, checkpoint: Path, steps: int, stop_at: int | None = None):
    torch.manual_seed(0)
    model = build_small_detr(small_detr_config(ARCH, train_split.categories))
    losses = {}

    def log_step(step, metrics):
        losses[step] = metrics["loss"]
        if step == stop_at:
            raise KeyboardInterrupt  # what an interrupted job looks like to the loop

    collate = DetrCollate(image_processor(InputSize(64, 64)), with_labels=True)
    pretrain(model, train_split, collate, _settings(steps), 0, checkpoint, log_step)
    return model, losses


def test_interrupted_pretraining_resumes_to_the_same_weights(train_split, tmp_path):
    reference, reference_losses = _train(train_split, tmp_path / "a.pt", steps=5)

    checkpoint = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(train_split, checkpoint, steps=5, stop_at=3)
    assert checkpoint.exists()  # written at step 2, before the interruption
    resumed, resumed_losses = _train(train_split, checkpoint, steps=5)

    assert sorted(resumed_losses) == [3, 4, 5]  # steps 1-2 came from the checkpoint
    assert resumed_losses == {s: reference_losses[s] for s in (3, 4, 5)}
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretrained_model_is_a_standard_detr(train_split, tmp_path):
    model, losses = _train(train_split, tmp_path / "c.pt", steps=3)
    assert not model.training
    norms = [m for m in model.model.backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, DetrFrozenBatchNorm2d) for m in norms)
    # Batch statistics were learned during pretraining and carried into the frozen norms.
    assert any(not torch.all(m.running_var == 1) for m in norms)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
