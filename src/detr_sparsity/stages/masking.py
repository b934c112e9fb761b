"""Stage `masking` (paper Fig. 2): keep k of H hidden activations per token, top-k by value vs k random.

One job per (method, keep-ratio) point of the sweep. It evaluates every scope at that point: each FFN block
masked alone, and all blocks at once, so a figure can show the curve of every block.
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split, row_metrics
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.blocks import ALL_BLOCKS
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.sparsity.policies import keep_count, masking_policy
from detr_sparsity.stages.rows import record_rows
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)


def run_stage(cfg: StudyConfig, tracked: StageRun, *, method: str, keep_ratio: float, model: Path, data: Path,
              detections: Path, rows: Path | None, sharding: Sharding = WHOLE_SPLIT) -> None:
    """Rows for every scope (all blocks, then each block alone) at one point of the sweep, keyed by scope (a
    mapping, so that `dvc metrics show` lists them as `<scope>.AP`, ...). A shard job writes one partial
    evaluation per scope into `detections` and no rows."""
    split = evaluation_split(cfg, data, sharding=sharding)
    detr = load_detr(model, device=job_device())
    blocks = list(ffn_blocks(detr))
    hidden = detr.config.encoder_ffn_dim
    if detr.config.decoder_ffn_dim != hidden:
        raise ValueError("masking assumes one FFN width for encoder and decoder blocks")
    found, metrics = {}, {}
    for scope in [ALL_BLOCKS, *blocks]:
        masked = blocks if scope == ALL_BLOCKS else [scope]
        policies = {name: masking_policy(method, keep_ratio, cfg.seed, name) for name in masked}
        measured = evaluate_policies(detr, split, policies, detections / f"{scope}.json")
        if measured is None:  # a shard job: the scope's partial evaluation is written
            continue
        row = {"method": method,
               "setting": {"keep_ratio": keep_ratio, "k": keep_count(keep_ratio, hidden), "scope": scope},
               **measured, "mlflow_run_id": tracked.run_id}
        found[scope] = row
        metrics.update({f"{key}.{scope}": value for key, value in row_metrics(row).items()})
        log.info("%s keep %s (k=%d) on %s: AP %.4f AP50 %.4f, induced sparsity %.3f", method, keep_ratio,
                 row["setting"]["k"], scope, row["AP"], row["AP50"], row["induced_sparsity"]["overall"])
    if not sharding.detects_shard:
        record_rows(tracked, rows, found, metrics)
