"""Load the dense DETR a study works on: from the hub (or a local copy), or the stage's saved model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import DetrForObjectDetection


def load_detr(name_or_path: str | Path, revision: str | None = None, device: str = "cpu") -> DetrForObjectDetection:
    """A DetrForObjectDetection in eval mode on `device`, from a hub id (at `revision`) or a local directory.

    facebook/detr-resnet-50 at revision `no_timm` uses transformers' own ResNet, so timm is not needed.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        model = DetrForObjectDetection.from_pretrained(local)
    else:
        model = DetrForObjectDetection.from_pretrained(str(name_or_path), revision=revision)
    return model.to(device).eval()


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal digests, unchanged weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
