"""Building a study's paper: latexmk on paper/main.tex beside the study's generated tables and figures.

Needs a LaTeX toolchain with latexmk (Debian: `apt-get install latexmk texlive-latex-recommended
texlive-fonts-recommended lmodern`). Without one, Snakemake's default target leaves the paper out and says so at
the start (`toolchain_missing`), and stage `paper` refuses with the same message, before any work.

Each study builds in its own directory (paper/<study>/, which holds its tables/ and figures/), so that main.tex's
relative \\input{tables/...} and figures/ find that study's: one study's paper never overwrites another's.
latexmk works in paper/<study>/.build (aux files, kept for incremental rebuilds); the PDF is copied onto
paper/<study>/main.pdf only when the build succeeded, so a failed build never leaves a PDF that looks current.
"""

from __future__ import annotations

import logging
import os
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
    return (f"no LaTeX toolchain ({' and '.join(missing)} not found): the paper PDF is not built. Install one to "
            f"build it, on Debian: apt-get install {LATEX_PACKAGES}")


def build_paper(tex: Path, pdf: Path) -> dict:
    """latexmk on `tex` in the PDF's directory (where the study's tables/ and figures/ are); returns what was
    built. Raises ToolchainMissing without a LaTeX toolchain."""
    reason = toolchain_missing()
    if reason:
        raise ToolchainMissing(reason)
    workdir = Path(pdf).parent
    build = workdir / ".build"
    command = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "-file-line-error",
               f"-outdir={build.name}", os.path.relpath(tex, workdir)]
    log.info("building %s: %s (in %s)", pdf, " ".join(command), workdir)
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    log.info("latexmk output:\n%s", result.stdout[-4000:])
    if result.returncode != 0:
        raise RuntimeError(f"latexmk failed on {tex} (exit {result.returncode}); see {build / Path(tex).stem}.log:\n"
                           f"{result.stdout[-2000:]}")
    with atomic_path(pdf) as tmp:
        shutil.copyfile(build / f"{Path(tex).stem}.pdf", tmp)
    version = subprocess.run(["pdflatex", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    info = {"pdf": str(pdf), "bytes": Path(pdf).stat().st_size, "latex": version}
    log.info("built %s (%d bytes) with %s", pdf, info["bytes"], version)
    return info
