"""Sharded evaluation's arithmetic of shards (the end-to-end check that N = 3 equals N = 1 exactly runs in
tests/test_orchestration.py, on the tiny study's finished Snakemake run)."""

from __future__ import annotations

import re

import pytest

from detr_sparsity.evaluation.shards import Sharding, parse_shard, shard_batches


@pytest.mark.parametrize("batches", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_cover_every_batch_once_in_order(batches, count):
    ranges = [shard_batches(batches, Sharding(k, count)) for k in range(1, count + 1)]
    assert [b for r in ranges for b in r] == list(range(batches))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("text, message", [("0/3", "must be in 1..3"), ("4/3", "must be in 1..3"),
                                           ("2", "expected K/N"), ("a/b", "expected K/N"), ("1/0", "N must be >= 1")])
def test_a_bad_shard_is_refused_with_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_shard(text)
