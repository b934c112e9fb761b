"""Stage `data`: the study's splits on disk (train, calibration, val), generated (synthetic) or fetched (COCO),
checked where they enter (every annotation, every image decoded fully) and listed in the manifest with each
image's digest."""

from __future__ import annotations

from pathlib import Path

from detr_sparsity.atomic import atomic_dir, write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.data.coco import prepare_coco
from detr_sparsity.data.dataset import MANIFEST, CocoDetection, load_split, verify_splits
from detr_sparsity.data.synthetic import SyntheticSpec, generate_synthetic
from detr_sparsity.machine import job_cores
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, out: Path) -> None:
    data = cfg.data
    with atomic_dir(out) as tmp:
        if data["source"] == "synthetic":
            spec = SyntheticSpec(num_images=0, image_size=data["image_size"], num_classes=data["num_classes"],
                                 min_objects=data["min_objects"], max_objects=data["max_objects"],
                                 count_decay=data["count_decay"])
            processes = job_cores()
            manifest = generate_synthetic(tmp, data["splits"], spec, cfg.seed, processes)
            tracked.log_metrics({"generation_processes": processes})
        else:
            manifest = prepare_coco(
                out_dir=tmp,
                root=Path(data["root"]) if data["root"] else None,
                base_url=data["base_url"],
                download_dir=Path(data["download_dir"]),
                val_images=data["val_images"],
                train_images=data["train_images"],
                calibration_images=data["calibration_images"],
                held_out_from_val=data["held_out_from_val"],
                seed=cfg.seed,
                download=data["download"],
            )
        # Before anything trains or evaluates on them: a bad image or annotation fails here, naming the file.
        manifest = verify_splits(tmp, manifest)
        write_json(tmp / MANIFEST, manifest)
    tracked.log_artifact(out / MANIFEST)
    tracked.log_metrics({f"images_{split}": len(CocoDetection(load_split(out, split))) for split in manifest})
