"""What recording a finished study in DVC costs after a Snakemake run: `dvc commit --force` of the stages Snakemake
ran (as the Snakefile's onsuccess did until 2026-12-07) against `sharing.record_in_dvc` (what it does now: the same
stages, each once, without DVC's run cache).

Run in the project root of a study that Snakemake has run; the two alternate, `--repeats` times, each as its own
process (as the onsuccess hook pays its imports too), and must leave the same dvc.lock. DVC copies outputs back with
new modification times: the outputs' own are restored afterwards, untimed, as the onsuccess hook restores them, so
that Snakemake still sees the study as up to date.

    python benchmarks/dvc_record.py --repeats 2

Writes results/<study>/benchmark/dvc_record.json (or --out).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from detr_sparsity.pipeline import PAPER, RESULTS, render
from detr_sparsity.sharing import dvc_targets, keeping_modification_times

from _common import arguments, parse, report

VARIANTS = {
    "dvc_commit": lambda: ["dvc", "commit", "--force", "--quiet", *dvc_targets()],
    "record_in_dvc": lambda: [sys.executable, "-c", "from detr_sparsity.sharing import record_in_dvc; record_in_dvc()"],
}


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(arguments(__doc__, "dvc_record", repeats=2), argv)
    seconds = {name: [] for name in VARIANTS}
    locks = {}
    with keeping_modification_times([Path(render(root, study=cfg.name)) for root in (RESULTS, PAPER)]):
        for _ in range(args.repeats):
            for name, command in VARIANTS.items():
                start = time.perf_counter()
                subprocess.run(command(), check=True)
                seconds[name].append(time.perf_counter() - start)
                locks[name] = Path("dvc.lock").read_text()
    if locks["dvc_commit"] != locks["record_in_dvc"]:
        raise SystemExit("error: the two wrote different dvc.lock files")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {"benchmark": "dvc_record", "targets": dvc_targets(), "repeats": args.repeats, "seconds": seconds,
              "median_seconds": median, "speedup": median["dvc_commit"] / median["record_in_dvc"]}
    return report(result, args.out, cfg.name,
                  f"recording the study in DVC: dvc commit {median['dvc_commit']:.1f} s, record_in_dvc "
                  f"{median['record_in_dvc']:.1f} s ({result['speedup']:.2f}x), the same dvc.lock")


if __name__ == "__main__":
    sys.exit(main())
