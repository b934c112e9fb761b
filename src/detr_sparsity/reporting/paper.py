"""Stage `paper`: build paper/main.pdf from paper/main.tex and the generated tables and figures.

Needs a LaTeX toolchain with latexmk (Debian: `apt-get install latexmk texlive-latex-recommended
texlive-fonts-recommended lmodern`). Without one, Snakemake leaves this stage out and says so at the start
(`toolchain_missing`), and the stage itself refuses with the same message, before any work.

latexmk works in paper/.build (aux files, kept for incremental rebuilds); the PDF is moved onto
paper/main.pdf only when the build succeeded, so a failed build never leaves a PDF that looks current.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from detr_sparsity.atomic import atomic_path

log = logging.getLogger(__name__)

LATEX_PACKAGES = "latexmk texlive-latex-recommended texlive-fonts-recommended lmodern"


class ToolchainMissing(RuntimeError):
    pass


def toolchain_missing() -> str | None:
    """Why the PDF cannot be built here, or None when latexmk and pdflatex are installed."""
    missing = [tool for tool in ("latexmk", "pdflatex") if shutil.which(tool) is None]
    if not missing:
        return None
    return (f"no LaTeX toolchain ({' and '.join(missing)} not found): paper/main.pdf is skipped. Install one to "
            f"build it, on Debian: apt-get install {LATEX_PACKAGES}")


def build_paper(tex: Path, pdf: Path, run) -> dict:
    """latexmk on `tex`; returns what was built. Raises ToolchainMissing without a LaTeX toolchain."""
    reason = toolchain_missing()
    if reason:
        raise ToolchainMissing(reason)
    tex = Path(tex)
    build = tex.parent / ".build"
    command = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "-file-line-error",
               f"-outdir={build.name}", tex.name]
    log.info("building %s: %s", pdf, " ".join(command))
    result = subprocess.run(command, cwd=tex.parent, capture_output=True, text=True)
    log.info("latexmk output:\n%s", result.stdout[-4000:])
    if result.returncode != 0:
        raise RuntimeError(f"latexmk failed on {tex} (exit {result.returncode}); see {build / tex.stem}.log:\n"
                           f"{result.stdout[-2000:]}")
    built = build / f"{tex.stem}.pdf"
    with atomic_path(pdf) as tmp:
        shutil.copyfile(built, tmp)
    version = subprocess.run(["pdflatex", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    run.log_artifact(pdf, "paper")
    run.set_tags({"latex": version})
    info = {"pdf": str(pdf), "bytes": Path(pdf).stat().st_size, "latex": version}
    log.info("built %s (%d bytes) with %s", pdf, info["bytes"], version)
    return info
