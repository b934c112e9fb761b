"""An evaluation job's passes run DETR from its front end's outputs, kept in memory after the first pass
(`evaluation.front_end`): each pass's detections, FLOPs and FFN counts are those of the plain full forward over the
loader's images, counted independently here; a later pass reads no image; a split over the memory limit, or
another model, is computed again."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from detr_sparsity.data.dataset import CocoDetection
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.evaluation.evaluate import evaluation_split, run_evaluation
from detr_sparsity.evaluation.flops import FlopCount
from detr_sparsity.evaluation.front_end import EvaluationFrontEnd
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns
from detr_sparsity.sparsity.policies import RandomKeep, TopK
from tiny_project import tiny_params, untracked_study


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic study's data and (3-step) model, made by the real stages, without MLflow."""
    work = tmp_path_factory.mktemp("front_end")
    cfg = untracked_study(work, tiny_params())
    return cfg, work, load_detr(work / "model")


def _policies(blocks: list[str]) -> dict:
    """Fresh policies that drop activations: top-k on the encoder, seeded random keeps on the decoder."""
    return {name: TopK(0.3) if name.startswith("encoder") else RandomKeep(0.5, 0, name) for name in blocks}


def _plain(model, split, policies) -> tuple[list[dict], int, dict]:
    """The reference: the full forward over the loader's images (no front end kept or stood in for), with the whole
    model's FLOPs counted around every forward; the detections, the FLOPs, each block's counts."""
    flops = FlopCount()
    with sparse_ffns(model, policies) as sparsity:
        def around(batch):
            return flops.forward(batch["pixel_values"])

        found = detect(model, split.processor, split.loader, around_forward=around,
                       start_batch=lambda batch: [p.start_batch(batch["image_ids"]) for p in policies.values()])
    return found, flops.total(), {name: dataclasses.asdict(w.counts) for name, w in sparsity.blocks.items()}


def _through_front_end(model, split, policies, path) -> tuple[list[dict], int, dict]:
    flops, sparsity, _ = run_evaluation(model, split, policies, path)
    return (json.loads(path.read_text()), flops.total(),
            {name: dataclasses.asdict(w.counts) for name, w in sparsity.blocks.items()})


@pytest.fixture
def image_reads(monkeypatch):
    """How many images the loaders have read (CocoDetection.__getitem__ calls)."""
    reads = []
    original = CocoDetection.__getitem__

    def counted(self, index):
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(CocoDetection, "__getitem__", counted)
    return reads


def test_passes_from_the_kept_front_end_are_the_full_forwards_and_read_no_image_again(tiny, tmp_path, image_reads):
    cfg, work, detr = tiny
    split = evaluation_split(cfg, work / "data")
    blocks = list(ffn_blocks(detr))
    assert len(split.loader) >= 2, "the tiny split should span several batches"
    expected = _plain(detr, split, _policies(blocks))
    image_reads.clear()

    first = _through_front_end(detr, split, _policies(blocks), tmp_path / "first.json")
    assert len(image_reads) == split.images  # the first pass prepares every image once
    image_reads.clear()
    second = _through_front_end(detr, split, _policies(blocks), tmp_path / "second.json")
    assert image_reads == []  # the later pass runs from the kept front end
    assert first == expected and second == expected
    assert expected[1] > 0 and len(expected[0]) == split.images * detr.config.num_queries


def test_a_split_over_the_memory_limit_and_another_model_are_computed_again(tiny, tmp_path, image_reads, caplog):
    cfg, work, detr = tiny
    split = evaluation_split(cfg, work / "data")
    split.front_end = EvaluationFrontEnd(split.loader, memory_bytes=1)  # less than one batch's feature map
    blocks = list(ffn_blocks(detr))
    expected = _plain(detr, split, _policies(blocks))
    image_reads.clear()
    with caplog.at_level(logging.INFO, logger="detr_sparsity.evaluation.front_end"):
        for name in ("a", "b"):
            assert _through_front_end(detr, split, _policies(blocks), tmp_path / f"{name}.json") == expected
    assert len(image_reads) == 2 * split.images
    # The first pass finds that the split does not fit; the second keeps nothing, so it says so only once.
    assert sum("takes more than" in record.getMessage() for record in caplog.records) == 1

    # Kept for one model, not served to another: a model with another backbone gets its own front end.
    split = evaluation_split(cfg, work / "data")
    _through_front_end(detr, split, _policies(blocks), tmp_path / "kept.json")
    other = load_detr(work / "model")
    with torch.no_grad():
        for parameter in other.model.input_projection.parameters():
            parameter.mul_(1.5)
    expected_other = _plain(other, split, _policies(blocks))
    assert expected_other[0] != expected[0]
    assert _through_front_end(other, split, _policies(blocks), tmp_path / "other.json") == expected_other
