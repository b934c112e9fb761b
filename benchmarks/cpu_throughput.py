"""How much the machine's cores add: float32 1024 x 1024 matmul throughput of one thread, of one process on every
core, and of one one-thread process per core running together (what the pipeline's sweeps do: one thread per job,
one job per core).

    python benchmarks/cpu_throughput.py --runs 3 --out benchmarks/results/cpu_throughput.json

Each rate is matmuls counted over --seconds after a warm-up, in GFLOP/s (2 x 1024^3 per matmul). Needs torch, and
the project's `machine` module to record the CPU beside the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

N = 1024


def rate(threads: int, seconds: float) -> float:
    """GFLOP/s of back-to-back N x N float32 matmuls at `threads` torch threads, over a fixed time window.

    A window, not the median of a count of runs as the benchmark stage's `machine_dense_gflops` takes it: processes
    measured together must overlap for the whole measurement, which equal windows ensure and equal counts do not."""
    torch.set_num_threads(threads)
    a, b = torch.randn(N, N), torch.randn(N, N)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * N**3 * count / (time.perf_counter() - start) / 1e9


def measure(seconds: float) -> dict[str, float]:
    cores = len(os.sched_getaffinity(0))
    one, every = rate(1, seconds), rate(cores, seconds)
    children = [subprocess.Popen([sys.executable, __file__, "--child", str(seconds)], stdout=subprocess.PIPE, text=True)
                for _ in range(cores)]
    together = sum(float(child.communicate()[0]) for child in children)
    return {"one_thread": one, "one_process_every_core": every, "one_thread_process_per_core_together": together,
            "load_average_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one of the processes running together
        print(rate(1, args.child))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from detr_sparsity.machine import machine

    result = {"benchmark": "cpu_throughput", "matmul": N, "seconds_per_rate": args.seconds, "machine": machine(),
              "runs": [measure(args.seconds) for _ in range(args.runs)]}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
