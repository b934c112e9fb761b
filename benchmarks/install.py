"""What installing the environment costs, until the sparse FFN's C++ kernel is built for this CPU and ready:
- `before`: pip byte-compiles each package as it installs it (the Makefile's recipe until 2026-12-07, late morning);
- `byte_compiled`: pip installs without byte-compiling, then the whole site-packages is byte-compiled on every core
  (the recipe until 2026-12-07, evening);
- `make_install`: the Makefile's own `install`, which also builds the kernel on the other core while pip installs
  the rest.
In the first two the kernel is then built by its first use (`python -m detr_sparsity.execution.cpu_kernel`, what a
study's benchmark stage did at its start); in the third the same command must find it built. Each environment builds
its own kernel (TORCH_EXTENSIONS_DIR in its folder: torch's build cache would otherwise serve one variant the other's).

Each variant builds a fresh virtual environment in a temporary folder from this checkout, the variants alternating,
`--repeats` times; then the same stage imports are timed in each (bytecode writing off, so that each reads what its
install compiled). Needs the package index `make install` uses; run in the project root:

    python benchmarks/install.py --repeats 2
    python benchmarks/install.py --repeats 2 --variants byte_compiled make_install \
        --out benchmarks/results/install_kernel.json

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


def before(venv: Path, env: dict) -> None:
    """pip byte-compiles every file it installs, one at a time."""
    _pip_installs(venv, env, [])


def byte_compiled(venv: Path, env: dict) -> None:
    """pip installs without byte-compiling; then compileall on every core."""
    _pip_installs(venv, env, ["--no-compile"])
    subprocess.run([str(venv / "bin" / "python"), "-c", "import compileall, sysconfig; compileall.compile_dir("
                    "sysconfig.get_path('purelib'), quiet=2, workers=0)"], check=True, env=env)


def _pip_installs(venv: Path, env: dict, options: list[str]) -> None:
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    for packages in (["--upgrade", "pip"], ["torch==2.13.0"], ["-e", ".[test]"]):
        subprocess.run([python, "-m", "pip", "install", "--quiet", *options, *packages], check=True, env=env)


def make_install(venv: Path, env: dict) -> None:
    """The Makefile's own install target, into `venv`."""
    subprocess.run(["make", "--no-print-directory", "install", f"VENV={venv}"], check=True, env=env)


VARIANTS = {"before": before, "byte_compiled": byte_compiled, "make_install": make_install}


def kernel_ready(venv: Path, env: dict) -> None:
    """The kernel as a stage's first use gets it: built now, or found built."""
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "detr_sparsity.execution.cpu_kernel"], check=True,
                          env=env, capture_output=True, text=True)
    if "kernel ready" not in done.stderr:
        raise RuntimeError(f"the C++ kernel was not built in {venv}:\n{done.stderr}")


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
    parser = arguments(__doc__, "install", repeats=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["before", "make_install"])
    args, cfg = parse(parser, argv)
    seconds = {name: [] for name in args.variants}
    kernel = {name: [] for name in args.variants}
    imports, compiled = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name in args.variants:
                venv = Path(scratch) / f"{name}-{repeat}"
                env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(venv.with_name(venv.name + "-extensions"))}
                start = time.perf_counter()
                VARIANTS[name](venv, env)
                installed = time.perf_counter()
                kernel_ready(venv, env)
                seconds[name].append(time.perf_counter() - start)
                kernel[name].append(time.perf_counter() - installed)
                if repeat == args.repeats - 1:
                    compiled[name] = bytecode_files(venv)
                    imports[name] = import_seconds(venv, 3)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    first, last = args.variants[0], args.variants[-1]
    result = {"benchmark": "install", "variants": args.variants, "repeats": args.repeats,
              "seconds": seconds, "median_seconds": median,
              "kernel_seconds_after_install": kernel,
              "median_kernel_seconds_after_install": {name: statistics.median(s) for name, s in kernel.items()},
              "speedup": median[first] / median[last], "speedup_of": [first, last], "bytecode_files": compiled,
              "stage_import_seconds": imports,
              "median_stage_import_seconds": {name: statistics.median(s) for name, s in imports.items()}}
    return report(result, args.out, cfg.name,
                  "installed, kernel ready: " + ", ".join(f"{name} {median[name]:.1f} s" for name in args.variants)
                  + f" ({first} / {last}: {result['speedup']:.2f}x); bytecode files "
                  + ", ".join(str(compiled[name]) for name in args.variants))


if __name__ == "__main__":
    sys.exit(main())
