"""benchmarks/pretrain_recipes.py: a recipe is the study's settings with exactly the overrides asked for, and an
override naming no setting, or a value that is not JSON, stops it before any training, naming the item and what
is allowed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # its `_common`, as when run as a script
spec = importlib.util.spec_from_file_location("benchmarks_pretrain_recipes", BENCHMARKS / "pretrain_recipes.py")
recipes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipes)

PRETRAIN = {"steps": 5500, "batch_size": 16, "learning_rate": 5.0e-4, "one_to_many_fraction": 0.5}


def test_overrides_replace_only_the_keys_named_with_their_json_values():
    got = recipes.overridden(PRETRAIN, ["batch_size=8", "learning_rate=1e-3"], "pretrain")
    assert got == {"steps": 5500, "batch_size": 8, "learning_rate": 0.001, "one_to_many_fraction": 0.5}
    assert isinstance(got["batch_size"], int)
    assert PRETRAIN["batch_size"] == 16  # the study's settings are left as they were
    assert recipes.overridden({"backbone_depths": [1, 1, 1]}, ["backbone_depths=[2, 2, 2]"], "architecture") == {
        "backbone_depths": [2, 2, 2]}


@pytest.mark.parametrize("item", ["batch=8", "batch_size"])
def test_an_override_naming_no_setting_stops_naming_it(item):
    with pytest.raises(SystemExit, match=f"{item!r}.*pretrain settings.*steps, batch_size"):
        recipes.overridden(PRETRAIN, [item], "pretrain")


def test_a_value_that_is_not_json_stops_naming_it_and_an_example():
    with pytest.raises(SystemExit, match=r"'batch_size=eight'.*must be JSON.*batch_size=16"):
        recipes.overridden(PRETRAIN, ["batch_size=eight"], "pretrain")


def test_an_input_override_replaces_the_input_size():
    size = {"shortest_edge": 128, "longest_edge": 128}
    assert recipes.overridden(size, ["shortest_edge=96", "longest_edge=96"], "input") == {
        "shortest_edge": 96, "longest_edge": 96}
    with pytest.raises(SystemExit, match=r"'edge=96'.*input settings.*shortest_edge, longest_edge"):
        recipes.overridden(size, ["edge=96"], "input")


def test_weight_averages_follow_the_warmed_up_decay_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    averages = recipes.WeightAverages(model, [0.5, 0.2])
    for step, weight in enumerate([1.0, 2.0, 3.0], start=1):
        model.weight.data.fill_(weight)
        averages(step)
    # decays used: min(d, 1/10), min(d, 2/11), min(d, 3/12); the first average is the first step's weight
    after_two = (2 / 11) * 1.0 + (9 / 11) * 2.0
    assert averages.kept[0.5]["weight"].item() == pytest.approx(0.25 * after_two + 0.75 * 3.0)
    assert averages.kept[0.2]["weight"].item() == pytest.approx(0.2 * after_two + 0.8 * 3.0)
    assert model.weight.item() == 3.0  # the model's own weights untouched
