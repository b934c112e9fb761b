"""Load the dense DETR a study works on: from the hub (or a local copy), or the stage's saved model."""

from __future__ import annotations

from pathlib import Path

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
