"""The job's device: the CPU unless a GPU is visible; DETR_SPARSITY_DEVICE overrides, and a bad value says why."""

from __future__ import annotations

import pytest
import torch

from detr_sparsity.device import DEVICE_ENV, job_device


def test_no_visible_gpu_means_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a scheduler sets for a job granted no GPU
    assert job_device() == "cpu"


def test_override(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "CPU")
    assert job_device() == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="allowed values: cpu, cuda"):
        job_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_cuda_forced_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        job_device()
