"""Stage `profile`: the dense model's activation statistics on the profiling split: profile.json (per-block and
per-image natural sparsity, firing-frequency spread) and neurons.safetensors (SIBS's per-neuron indicators)."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from detr_sparsity.atomic import atomic_path, write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.profile import profile_activations, profile_summary
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, model: Path, data: Path, profile: Path, neurons: Path) -> None:
    split_name = cfg.profile["split"]
    split = evaluation_split(cfg, data, split_name, scored=False)  # activations only: no AP, no ground truth needed
    detr = load_detr(model, device=job_device())
    natural, activations = profile_activations(detr, split.loader, total=len(split.loader))
    summary, indicators = profile_summary(split_name, split.images, natural, activations)
    with atomic_path(neurons) as tmp:
        save_file(indicators, str(tmp))
    write_json(profile, summary)
    names = list(summary["per_block"])
    metrics = {"natural_sparsity": natural["overall"]}
    for name in names:
        metrics[f"natural_sparsity.{name}"] = natural["per_block"][name]
        metrics[f"natural_sparsity_std.{name}"] = summary["per_block"][name]["per_image"]["std"]
    tracked.log_metrics(metrics)
    tracked.log_artifact(profile)
    log.info("profile of %d %s images: natural sparsity %.3f (%s)", split.images, split_name, natural["overall"],
             ", ".join(f"{n} {natural['per_block'][n]:.3f}" for n in names))
