"""Stage `figures`: F1-F6 as PDF and PNG with their captions (paper/<study>/figures), and the curves as CSV series
for `dvc plots` (results/<study>/plots)."""

from __future__ import annotations

import json
from pathlib import Path

from detr_sparsity.atomic import atomic_dir
from detr_sparsity.config import StudyConfig
from detr_sparsity.pipeline import plot_series
from detr_sparsity.reporting.figures import write_figures, write_plot_series
from detr_sparsity.reporting.records import Comparisons, StudyRecord
from detr_sparsity.reporting.reported import stand_in
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, summary: Path, profile: Path, speed: Path,
              comparisons: Path, trained: Path, out: Path, plots: Path) -> None:
    record = StudyRecord.load(summary)
    # The end-to-end trainings' records (stage mgs_train), one per objective, with their curves.
    trainings = [json.loads(p.read_text()) for p in sorted(trained.glob("*.json"))]
    with atomic_dir(out) as tmp:
        drawn = write_figures(tmp, cfg.name, cfg.evaluate["split"], record,
                              json.loads(profile.read_text()), trainings,
                              json.loads(speed.read_text()), Comparisons.load(comparisons),
                              stand_in=stand_in(cfg.model))
    with atomic_dir(plots) as tmp:
        write_plot_series(record, tmp, plot_series())
    tracked.log_artifact(out, "figures")
    tracked.log_artifact(plots, "plots")
    tracked.log_metrics({"figures": len(drawn)})
