"""The scopes of one point of a sweep evaluated together (stage `masking`: all blocks at once, and each block
alone), with the passes that would repeat the dense model's left out.

A mask that keeps every nonzero activation changes nothing: fc2(m * relu(fc1 x)) is fc2(relu(fc1 x)) bit for bit
(a kept value times 1, a zero times 0 or 1). So where a scope's masks, asked on the dense model's activations,
drop no nonzero activation of any token of any batch, each block it masks gets the dense input (every block
before it ran dense, or dropped nothing: by induction, block by block) and returns the dense output: the scope's
forward passes are the dense ones, its detections are the dense detections, and its counts are the dense pass's
but for what its masks keep, asked there too. One dense pass, its policies' masks computed beside it on every
block, finds those scopes and gives their rows; only the other scopes run. Where the first batch already shows
every scope dropping activations (random masks), there is no dense pass.

The masks are asked inside the dense pass's FLOP count, so this is for policies whose masks run no op the counter
counts (top-k, random, threshold: a comparison, a sort, draws); a gate's matmul would be counted once per scope
asking it.

The default study's stand-in leaves about 98 % of its FFN activations at zero. In its committed sweep the threshold
oracle (every calibrated threshold is 0), top-k at keep 1.0, 0.5 and 0.3 and random at 1.0 drop nothing, and so do
5 single-block scopes of top-k at 0.2, 0.15 and 0.1: 82 of the 147 scopes, in 14 of the 21 jobs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from transformers import DetrForObjectDetection

from detr_sparsity.evaluation.coco_eval import AP_METRICS
from detr_sparsity.evaluation.evaluate import EvaluationSplit, evaluate_policies, measured_row, run_evaluation
from detr_sparsity.sparsity.ffn import BlockCounts, FFNSparsity, SparseFFN, ffn_blocks, sparse_ffns
from detr_sparsity.sparsity.policies import Policy

log = logging.getLogger(__name__)

# A scope's policies by block, new objects at every call: a policy may hold its draws (random masks).
PolicyFactory = Callable[[str], Mapping[str, Policy]]


class _Probe(Policy):
    """Runs its block dense and asks the block's policy of each scope what it would keep: whether it drops a
    nonzero activation (any token, padding included), and how many neurons it keeps on the real tokens."""

    def __init__(self, asked: Mapping[str, Policy]) -> None:
        self.asked = asked
        self.drops = dict.fromkeys(asked, False)
        self.kept = dict.fromkeys(asked, 0)
        self._per_token: dict[str, torch.Tensor | None] = {}

    def start_batch(self, image_ids: list[int]) -> None:
        for policy in self.asked.values():
            policy.start_batch(image_ids)

    def mask(self, inputs: torch.Tensor, activations: torch.Tensor) -> None:
        for scope, policy in self.asked.items():
            keep = policy.mask(inputs, activations)
            if keep is None:  # keeps all
                self._per_token[scope] = None
                continue
            keep = torch.broadcast_to(keep, activations.shape)
            if not self.drops[scope]:
                self.drops[scope] = bool(torch.any((activations != 0) & ~keep))
            self._per_token[scope] = keep.sum(dim=-1)
        return None  # the block runs dense

    def count_kept(self, activations: torch.Tensor, real: torch.Tensor | None) -> None:
        """After `mask`, on the same forward: the kept neurons over real tokens, as the wrapper counts them."""
        for scope, per_token in self._per_token.items():
            if per_token is None:
                per_token = torch.full(activations.shape[:-1], activations.shape[-1], dtype=torch.int64)
            self.kept[scope] += int(per_token.sum() if real is None else (per_token * real).sum())
        self._per_token = {}


def evaluate_scopes(model: DetrForObjectDetection, data: EvaluationSplit, scopes: list[str],
                    policies_for: PolicyFactory, detections_dir: Path,
                    check: Callable[[list[dict]], dict] | None = None) -> dict[str, dict | None]:
    """Each scope's `evaluate_policies(model, data, policies_for(scope), detections_dir / "<scope>.json", check)`,
    the same rows and detections, with the scopes whose masks drop nothing taken from one dense pass. Sharded
    evaluations (a shard job, a gather job) evaluate every scope as `evaluate_policies` does."""
    paths = {scope: detections_dir / f"{scope}.json" for scope in scopes}
    sharded = data.sharding.detects_shard or data.sharding.gathers
    blocks = list(ffn_blocks(model))
    rows: dict[str, dict | None] = {}
    if not (sharded or _every_scope_drops_on_the_first_batch(model, data, scopes, policies_for, blocks)):
        rows = _from_the_dense_pass(model, data, scopes, policies_for, blocks, paths, check)
    for scope in scopes:
        if scope not in rows:
            rows[scope] = evaluate_policies(model, data, policies_for(scope), paths[scope], check)
    return {scope: rows[scope] for scope in scopes}


def _from_the_dense_pass(model: DetrForObjectDetection, data: EvaluationSplit, scopes: list[str],
                         policies_for: PolicyFactory, blocks: list[str], paths: dict[str, Path],
                         check: Callable[[list[dict]], dict] | None) -> dict[str, dict]:
    """One dense pass asking every scope's masks; the rows of the scopes that drop nothing, their detections written."""
    probes = _probes(scopes, policies_for, blocks)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        dense_path = Path(scratch) / "dense.json"
        flops, dense, checked = run_evaluation(
            model, data, probes, dense_path, check, observer=lambda name, activations, real, _nonzero:
            probes[name].count_kept(activations, real))
        dense_ap = None  # scored once, for the first scope that takes the dense detections
        for scope in scopes:
            if any(probe.drops.get(scope, False) for probe in probes.values()):
                continue
            policies = policies_for(scope)
            counts = {name: _counts_with_kept(dense.blocks[name].counts, probes[name].kept.get(scope))
                      for name in blocks}
            sparsity = FFNSparsity({name: _counted(model, name, policies.get(name, Policy()), counts[name])
                                    for name in blocks})
            paths[scope].parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dense_path, paths[scope])
            rows[scope] = measured_row(data, paths[scope], flops, sparsity, checked, dense_ap)
            dense_ap = {key: rows[scope][key] for key in AP_METRICS}
            log.info("%s: its masks drop no nonzero activation on the %s split: the dense pass's detections",
                     scope, data.split.name)
    return rows


def _probes(scopes: list[str], policies_for: PolicyFactory, blocks: list[str]) -> dict[str, _Probe]:
    """A probe on every block, asking the block's policy of each scope that masks it."""
    asked = {scope: dict(policies_for(scope)) for scope in scopes}
    return {name: _Probe({scope: policies[name] for scope, policies in asked.items() if name in policies})
            for name in blocks}


def _every_scope_drops_on_the_first_batch(model: DetrForObjectDetection, data: EvaluationSplit, scopes: list[str],
                                          policies_for: PolicyFactory, blocks: list[str]) -> bool:
    """Whether the first batch alone shows that every scope drops an activation, so that a dense pass would find
    none to take from it (one batch's forward, not the split's)."""
    probes = _probes(scopes, policies_for, blocks)
    batch = next(iter(data.loader))
    model.eval()
    with torch.no_grad(), sparse_ffns(model, probes):
        for probe in probes.values():
            probe.start_batch(batch["image_ids"])
        model(pixel_values=batch["pixel_values"].to(model.device), pixel_mask=batch["pixel_mask"].to(model.device))
    return all(any(probe.drops.get(scope, False) for probe in probes.values()) for scope in scopes)


def _counts_with_kept(dense: BlockCounts, kept: int | None) -> BlockCounts:
    """A block's counts in a scope that drops nothing: the dense pass's, with the scope's kept neurons (all, for a
    block the scope runs dense); every zero after masking is a natural zero."""
    tokens = int(dense.tokens)
    return BlockCounts(tokens=tokens, all_tokens=dense.all_tokens, natural_zeros=int(dense.natural_zeros),
                       kept=int(dense.kept) if kept is None else kept, effective_zeros=int(dense.natural_zeros))


def _counted(model: DetrForObjectDetection, name: str, policy: Policy, counts: BlockCounts) -> SparseFFN:
    """A wrapper holding `counts`, as if it had run with `policy` (never installed in the model: it only counts)."""
    wrapper = SparseFFN(ffn_blocks(model)[name], name, policy)
    wrapper.counts = counts
    return wrapper
