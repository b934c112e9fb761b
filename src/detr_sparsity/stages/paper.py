"""Stage `paper`: the study's paper PDF, built by latexmk from paper/main.tex and the study's tables and figures
(needs a LaTeX toolchain; without one the CLI refuses before any run is opened)."""

from __future__ import annotations

from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.reporting.paper import build_paper, toolchain_missing
from detr_sparsity.tracking import StageRun


def run_stage(cfg: StudyConfig, tracked: StageRun, *, tex: Path, figures: Path, tables: Path, pdf: Path) -> None:
    info = build_paper(tex, pdf)
    tracked.log_artifact(pdf, "paper")
    tracked.set_tags({"latex": info["latex"]})
    tracked.log_metrics({"pdf_bytes": info["bytes"]})


def refusal() -> str | None:
    """Why the stage cannot run here (no LaTeX toolchain), checked before any MLflow run is opened."""
    return toolchain_missing()
