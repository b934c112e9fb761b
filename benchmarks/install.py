"""What installing the environment costs: `make install` (pip installs without byte-compiling, then the whole
site-packages is byte-compiled on every core) against pip byte-compiling each package as it installs it (the
Makefile's recipe until 2026-12-07, restated here as `before`).

Each variant builds a fresh virtual environment in a temporary folder from this checkout, the two alternating,
`--repeats` times; then the same stage imports are timed in each (bytecode writing off, so that each reads what its
install compiled). Needs the package index `make install` uses; run in the project root:

    python benchmarks/install.py --repeats 2

Writes results/<study>/benchmark/install.json (or --out).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import arguments, parse, report

# A stage's imports: the package, torch, transformers' DETR, MLflow and its SQL store (what every job pays).
STAGE_IMPORTS = "import detr_sparsity.stages.masking, mlflow.store.tracking.sqlalchemy_store"


def before(venv: Path) -> None:
    """The recipe before: pip byte-compiles every file it installs, one at a time."""
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for packages in (["--upgrade", "pip"], ["torch==2.13.0"], ["-e", ".[test]"]):
        subprocess.run([python, "-m", "pip", "install", "--quiet", *packages], check=True)


def make_install(venv: Path) -> None:
    """The Makefile's own install target, into `venv`."""
    subprocess.run(["make", "--no-print-directory", "install", f"VENV={venv}"], check=True)


VARIANTS = {"before": before, "make_install": make_install}


def bytecode_files(venv: Path) -> int:
    return sum(1 for _ in venv.glob("lib/python*/site-packages/**/__pycache__/*.pyc"))


def import_seconds(venv: Path, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(venv / "bin" / "python"), "-c", STAGE_IMPORTS], check=True, env=env)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(arguments(__doc__, "install", repeats=2), argv)
    seconds = {name: [] for name in VARIANTS}
    imports, compiled = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, install in VARIANTS.items():
                venv = Path(scratch) / f"{name}-{repeat}"
                start = time.perf_counter()
                install(venv)
                seconds[name].append(time.perf_counter() - start)
                if repeat == args.repeats - 1:
                    compiled[name] = bytecode_files(venv)
                    imports[name] = import_seconds(venv, 3)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"benchmark": "install", "repeats": args.repeats, "seconds": seconds, "median_seconds": median,
              "speedup": median["before"] / median["make_install"], "bytecode_files": compiled,
              "stage_import_seconds": imports,
              "median_stage_import_seconds": {name: statistics.median(s) for name, s in imports.items()}}
    return report(result, args.out, cfg.name,
                  f"installing: pip compiling {median['before']:.1f} s, make install {median['make_install']:.1f} s "
                  f"({result['speedup']:.2f}x); bytecode files {compiled['before']} and {compiled['make_install']}")


if __name__ == "__main__":
    sys.exit(main())
