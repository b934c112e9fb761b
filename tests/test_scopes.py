"""Scopes evaluated together (`evaluation.scopes`): a scope whose masks drop no nonzero activation is taken from the
dense pass, and its row and detections are those of its own full evaluation (`evaluate_policies`), key for key;
the other scopes run as before."""

from __future__ import annotations

import json

import pytest
import torch

from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split
from detr_sparsity.evaluation.scopes import evaluate_scopes
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.sparsity.policies import RandomKeep, Threshold, TopK
from tiny_project import tiny_params, untracked_study


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic study's data and (3-step) model, made by the real stages, without MLflow."""
    work = tmp_path_factory.mktemp("scopes")
    cfg = untracked_study(work, tiny_params())
    return cfg, work, load_detr(work / "model")


def _policies(scope: str, blocks: list[str]) -> dict:
    """Fresh policies per call. Threshold 0 keeps exactly the nonzero activations (drops nothing, but skips the
    zeros: induced sparsity = natural); top-k at keep 1.0 keeps all; the others drop activations."""
    if scope == "threshold-0":
        return {name: Threshold(0.0) for name in blocks}
    if scope == "topk-1.0-decoder":
        return {name: TopK(1.0) for name in blocks if name.startswith("decoder")}
    if scope == "topk-0.1-encoder.0":
        return {"encoder.0": TopK(0.1)}
    if scope == "random-0.5":
        return {name: RandomKeep(0.5, 0, name) for name in blocks}
    if scope == "threshold-high-all":
        return {name: Threshold(0.05) for name in blocks}
    raise KeyError(scope)


SCOPES = ["threshold-0", "topk-0.1-encoder.0", "topk-1.0-decoder", "random-0.5", "threshold-high-all"]
DROP_NOTHING = {"threshold-0", "topk-1.0-decoder"}


def test_scopes_that_drop_nothing_have_the_rows_and_detections_of_their_own_evaluation(tiny, tmp_path):
    cfg, work, detr = tiny
    split = evaluation_split(cfg, work / "data")
    blocks = list(ffn_blocks(detr))
    forwards = []
    hook = detr.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        together = evaluate_scopes(detr, split, SCOPES, lambda scope: _policies(scope, blocks), tmp_path / "together")
        passes_together = len(forwards)
        forwards.clear()
        alone = {scope: evaluate_policies(detr, split, _policies(scope, blocks), tmp_path / "alone" / f"{scope}.json")
                 for scope in SCOPES}
        passes_alone = len(forwards)
    finally:
        hook.remove()
    batches = len(split.loader)
    assert passes_alone == len(SCOPES) * batches
    # the first batch (every scope dropping there would mean no dense pass), one dense pass, then only the scopes
    # that drop activations
    assert passes_together == 1 + (1 + len(SCOPES) - len(DROP_NOTHING)) * batches

    assert list(together) == SCOPES
    for scope in SCOPES:
        ours, reference = dict(together[scope]), dict(alone[scope])
        assert json.loads((tmp_path / "together" / f"{scope}.json").read_text()) == \
            json.loads((tmp_path / "alone" / f"{scope}.json").read_text()), scope
        assert ours.pop("detections") == str(tmp_path / "together" / f"{scope}.json")
        reference.pop("detections")
        assert ours == reference, scope

    # the cases are what they claim: threshold 0 skips the zeros without dropping anything, the others drop some
    zero = alone["threshold-0"]
    assert 0 < zero["induced_sparsity"]["overall"] == zero["natural_sparsity"]["overall"] \
        == zero["effective_sparsity"]["overall"] < 1
    assert zero["ffn_flops"]["as_run"] < zero["ffn_flops"]["dense"]
    assert alone["topk-1.0-decoder"]["induced_sparsity"]["overall"] == 0.0
    for scope in set(SCOPES) - DROP_NOTHING:
        row = alone[scope]
        assert row["effective_sparsity"]["overall"] > row["natural_sparsity"]["overall"], scope


def test_where_every_scope_drops_on_the_first_batch_there_is_no_dense_pass(tiny, tmp_path):
    cfg, work, detr = tiny
    split = evaluation_split(cfg, work / "data")
    blocks = list(ffn_blocks(detr))
    scopes = ["random-0.5", "threshold-high-all"]
    forwards = []
    hook = detr.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        together = evaluate_scopes(detr, split, scopes, lambda scope: _policies(scope, blocks), tmp_path / "together")
    finally:
        hook.remove()
    assert len(forwards) == 1 + len(scopes) * len(split.loader)
    for scope in scopes:
        alone = evaluate_policies(detr, split, _policies(scope, blocks), tmp_path / "alone" / f"{scope}.json")
        assert {**together[scope], "detections": None} == {**alone, "detections": None}, scope


def test_a_sharded_evaluation_evaluates_every_scope(tiny, tmp_path):
    """Shard jobs write a partial evaluation per scope (no dense pass: a gather job could not tell its scopes)."""
    from detr_sparsity.evaluation.shards import Sharding

    cfg, work, detr = tiny
    split = evaluation_split(cfg, work / "data", sharding=Sharding(1, 2))
    blocks = list(ffn_blocks(detr))
    found = evaluate_scopes(detr, split, ["threshold-0", "random-0.5"], lambda scope: _policies(scope, blocks),
                            tmp_path)
    assert found == {"threshold-0": None, "random-0.5": None}
    assert (tmp_path / "threshold-0.json").exists() and (tmp_path / "random-0.5.json").exists()
