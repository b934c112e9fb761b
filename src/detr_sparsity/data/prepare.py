"""Stage `data`: the study's splits on disk (train, calibration, val) plus their manifest."""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import atomic_dir, write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.coco import prepare_coco
from detr_sparsity.data.dataset import MANIFEST
from detr_sparsity.data.synthetic import SyntheticSpec, generate_synthetic

log = logging.getLogger(__name__)


def prepare_data(cfg: StudyConfig, out_dir: Path) -> dict:
    """Generate (synthetic) or fetch (COCO) every split into `out_dir`; returns the manifest."""
    data = cfg.data
    with atomic_dir(out_dir) as tmp:
        if data["source"] == "synthetic":
            spec = SyntheticSpec(
                num_images=0,
                image_size=data["image_size"],
                num_classes=data["num_classes"],
                min_objects=data["min_objects"],
                max_objects=data["max_objects"],
                count_decay=data["count_decay"],
            )
            manifest = generate_synthetic(tmp, data["splits"], spec, cfg.seed)
            write_json(tmp / MANIFEST, manifest)
        else:
            manifest = prepare_coco(
                out_dir=tmp,
                root=Path(data["root"]) if data["root"] else None,
                base_url=data["base_url"],
                download_dir=Path(data["download_dir"]),
                val_images=data["val_images"],
                train_images=data["train_images"],
                calibration_images=data["calibration_images"],
                seed=cfg.seed,
                download=data["download"],
            )
    return manifest
