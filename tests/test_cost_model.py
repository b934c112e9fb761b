"""benchmarks/cost_model.py: its DETR-R50 FLOPs agree with the published count, and its schedule with N GPUs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_model.py"
spec = importlib.util.spec_from_file_location("benchmarks_cost_model", PATH)
cost_model = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cost_model
spec.loader.exec_module(cost_model)


def test_detr_r50_ffn_share_is_the_published_seven_percent():
    ffn = cost_model.ffn_flops(cost_model.DETR_R50, cost_model.COCO_ENCODER_TOKENS)
    assert ffn / cost_model.COCO_FLOPS_PER_IMAGE == pytest.approx(0.07, abs=0.005)
    # the transformer is a small part of DETR-R50: the ResNet-50 backbone dominates
    transformer = cost_model.transformer_flops(cost_model.DETR_R50, cost_model.COCO_ENCODER_TOKENS)
    assert ffn < transformer < 0.2 * cost_model.COCO_FLOPS_PER_IMAGE


def test_schedule_runs_independent_jobs_side_by_side_and_waits_for_inputs():
    jobs = [{"name": "cache", "after": [], "gpu": True, "seconds": 1.0}]
    jobs += [{"name": f"train-{i}", "after": ["cache"], "gpu": True, "seconds": 4.0} for i in range(4)]
    jobs += [{"name": f"eval-{i}", "after": [f"train-{i}"], "gpu": True, "seconds": 1.0} for i in range(4)]
    assert cost_model.schedule(jobs, 1) == 1 + 4 * 4 + 4 * 1
    assert cost_model.schedule(jobs, 4) == 1 + 4 + 1
    assert cost_model.schedule(jobs, 100) == 1 + 4 + 1
