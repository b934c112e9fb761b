"""What every benchmark result records about where it ran, so that ratios are compared like for like."""

from __future__ import annotations

import os
import platform

import torch
import transformers


def environment() -> dict:
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
