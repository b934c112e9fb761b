"""Stage `tables`: T0-T6 as Markdown (results/<study>/tables) and LaTeX (paper/<study>/tables), with the study's
macros for the paper; the bootstrap intervals come from the summary stage's comparisons.json."""

from __future__ import annotations

import json
from pathlib import Path

from detr_sparsity.atomic import atomic_dir
from detr_sparsity.config import StudyConfig
from detr_sparsity.reporting.records import Comparisons, StudyRecord
from detr_sparsity.reporting.reported import stand_in
from detr_sparsity.reporting.tables import write_tables
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, summary: Path, profile: Path, model: Path, speed: Path,
              comparisons: Path, cost: Path, markdown: Path, latex: Path) -> None:
    with atomic_dir(markdown) as md, atomic_dir(latex) as tex:
        written = write_tables(md, tex, cfg.name, StudyRecord.load(summary),
                               json.loads(profile.read_text()),
                               json.loads((model / "config.json").read_text()), json.loads(speed.read_text()),
                               Comparisons.load(comparisons), json.loads(cost.read_text()),
                               stand_in=stand_in(cfg.model))
    tracked.log_artifact(markdown, "tables")
    tracked.log_artifact(latex, "paper_tables")
    tracked.log_metrics({"tables": len(written)})
