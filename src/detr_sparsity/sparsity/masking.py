"""Stage `masking` (paper Fig. 2): keep k of H hidden activations per token, top-k by value vs k random.

One job per (method, keep-ratio) point of the sweep. It evaluates every scope at that point: each FFN
block masked alone, and all blocks at once, so a figure can show the curve of every block.
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation.evaluate import evaluate_policies, evaluation_split, row_metrics
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.blocks import ALL_BLOCKS
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.sparsity.policies import Policy, RandomKeep, TopK, keep_count
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)

MASKING_METHODS = ("topk", "random")


def masking_policy(method: str, keep_ratio: float, seed: int, block: str) -> Policy:
    if method == "topk":
        return TopK(keep_ratio)
    if method == "random":
        return RandomKeep(keep_ratio, seed, block)
    raise ValueError(f"masking method {method!r} is not known; allowed: {', '.join(MASKING_METHODS)}")


def masking_stage(cfg: StudyConfig, method: str, keep_ratio: float, model_dir: Path, data_dir: Path,
                  detections_dir: Path, rows_path: Path | None, run: StageRun,
                  sharding: Sharding = WHOLE_SPLIT) -> dict[str, dict] | None:
    """Rows for every scope (all blocks, then each block alone) at one point of the sweep, keyed by scope
    (a mapping, so that `dvc metrics show` lists them as `<scope>.AP`, ...). A shard job writes one partial
    evaluation per scope into `detections_dir` and no rows."""
    masking_policy(method, keep_ratio, cfg.seed, "encoder.0")  # a bad method or ratio fails here, before any work
    data = evaluation_split(cfg, data_dir, sharding=sharding)
    model = load_detr(model_dir, device=job_device())
    blocks = list(ffn_blocks(model))
    hidden = model.config.encoder_ffn_dim
    if model.config.decoder_ffn_dim != hidden:
        raise ValueError("masking assumes one FFN width for encoder and decoder blocks")
    rows = {}
    for scope in [ALL_BLOCKS, *blocks]:
        masked = blocks if scope == ALL_BLOCKS else [scope]
        policies = {name: masking_policy(method, keep_ratio, cfg.seed, name) for name in masked}
        measured = evaluate_policies(model, data, policies, detections_dir / f"{scope}.json")
        if measured is None:  # a shard job: the scope's partial evaluation is written
            continue
        row = {"method": method,
               "setting": {"keep_ratio": keep_ratio, "k": keep_count(keep_ratio, hidden), "scope": scope},
               **measured, "mlflow_run_id": run.run_id}
        rows[scope] = row
        run.log_metrics({f"{key}.{scope}": value for key, value in row_metrics(row).items()})
        log.info("%s keep %s (k=%d) on %s: AP %.4f AP50 %.4f, induced sparsity %.3f", method, keep_ratio,
                 row["setting"]["k"], scope, row["AP"], row["AP50"], row["induced_sparsity"]["overall"])
    if sharding.detects_shard:
        return None
    write_json(rows_path, rows)
    run.log_artifact(rows_path)
    return rows
