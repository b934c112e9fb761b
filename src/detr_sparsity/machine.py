"""The machine a measurement ran on, recorded with every benchmark result so that ratios are compared like for like."""

from __future__ import annotations

import os
import platform

import torch
import transformers


def environment() -> dict:
    """Platform, processor, cores, torch threads and library versions."""
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
