"""The machine a measurement ran on, recorded with every stage run and every benchmark result, so that times and
ratios are compared like for like (the project's machines come in two classes: with AVX-512, and AVX2 only)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def instruction_set() -> str:
    """The widest vector instruction set the CPU offers for float32 matmuls: avx512, avx2 or other."""
    flags = set(_cpuinfo_field("flags").split())
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def job_cores() -> int:
    """The cores a job may keep busy: OMP_NUM_THREADS where the scheduler set it (Snakemake sets it to the job's
    threads), else every core this process may run on (DVC runs one job at a time)."""
    scheduled = os.environ.get("OMP_NUM_THREADS", "")
    return int(scheduled) if scheduled.isdigit() and int(scheduled) > 0 else len(os.sched_getaffinity(0))


def machine() -> dict:
    """CPU model, its instruction-set class, the cores this process may use, and the load average now."""
    return {"cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "instruction_set": instruction_set(), "cores": len(os.sched_getaffinity(0)),
            "load_average": round(os.getloadavg()[0], 2)}


def environment() -> dict:
    """The machine, torch's threads and the library versions."""
    import torch
    import transformers

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **machine()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
