"""The torch device a job was given: CUDA when the scheduler granted it a GPU, else the CPU.

Kept out of the stages' packages (data/, models/, sparsity/, mgs/, evaluation/, execution/, reporting/), whose
files are the stages' code dependencies: choosing a device here reruns no stage.
"""

from __future__ import annotations

import os

DEVICE_ENV = "DETR_SPARSITY_DEVICE"  # cpu or cuda: overrides the choice (e.g. cpu on a GPU node, for a comparison)
DEVICES = ("cpu", "cuda")


def job_device() -> str:
    """'cuda' when a GPU is visible to this process, else 'cpu'; DETR_SPARSITY_DEVICE overrides.

    A scheduler that grants GPUs makes exactly those visible (SLURM sets CUDA_VISIBLE_DEVICES for `--gpus`), so a
    job that asked for no GPU sees none there. A local run sees the machine's GPUs, if any.
    """
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced:
        if forced not in DEVICES:
            raise ValueError(f"{DEVICE_ENV}={forced!r} is not allowed: allowed values: {', '.join(DEVICES)}")
        if forced == "cuda" and not _cuda_available():
            raise ValueError(f"{DEVICE_ENV}=cuda but this job sees no CUDA device")
        return forced
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False  # the scheduler hid every GPU: no need to initialise CUDA to know
    import torch

    return torch.cuda.is_available()
