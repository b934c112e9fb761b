"""Stage `masking` (paper Fig. 2): keep k of H hidden activations per token, top-k by value vs k random; and the
dynamic `threshold` oracle, which keeps the activations above a per-block threshold calibrated on the calibration
split to induced sparsity 1 - keep_ratio (the number kept varies per token): each block alone at that sparsity,
and all blocks at once at that overall sparsity, allocated across the blocks as `masking.threshold_allocation`
says (`sparsity.thresholds`).

One job per (method, keep-ratio) point of the sweep. It evaluates every scope at that point: each FFN block
masked alone, and all blocks at once, so a figure can show the curve of every block. The scopes whose masks drop
no nonzero activation come from one dense pass, with the rows their own passes would give (`evaluation.scopes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from detr_sparsity.config import StudyConfig
from detr_sparsity.device import job_device
from detr_sparsity.evaluation import shards
from detr_sparsity.evaluation.evaluate import evaluation_split, row_metrics
from detr_sparsity.evaluation.scopes import evaluate_scopes
from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.blocks import ALL_BLOCKS
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.sparsity.policies import check_keep_ratio, keep_count, masking_policy
from detr_sparsity.sparsity.thresholds import allocate_thresholds, calibrate_thresholds
from detr_sparsity.stages.rows import record_rows
from detr_sparsity.tracking import StageRun

log = logging.getLogger(__name__)

CALIBRATION = "threshold_calibration"  # a shard job's calibration, attached to its partial evaluations


def threshold_target(keep_ratio: float) -> float:
    """The induced-sparsity target of the threshold policy at a keep-ratio (rounded: 1 - 0.85 is 0.1500...02)."""
    return round(1.0 - check_keep_ratio(keep_ratio), 12)


def calibration_record(cfg: StudyConfig, detr, data: Path, keep_ratio: float) -> dict:
    """The threshold policy's calibration at this keep-ratio, on the calibration split: `blocks`, each block's
    threshold at the target (single-block scopes), and `allocated`, the thresholds of the all-blocks scope."""
    allocation = cfg.masking["threshold_allocation"]
    split_name = cfg.profile["split"]
    target = threshold_target(keep_ratio)
    split = evaluation_split(cfg, data, split_name, scored=False)  # activations only: no ground truth needed
    record = {"split": split_name, "images": split.images, "target": target, "allocation": allocation}
    if allocation == "uniform":  # one dense pass
        found = calibrate_thresholds(detr, split.loader, [target], total=len(split.loader))
        uniform = {name: per_target[target] for name, per_target in found.items()}
        allocated = uniform
    else:  # two dense passes: the histogram, then the output error at each block's grid of thresholds
        uniform, allocated, record["greedy"] = allocate_thresholds(detr, split.loader, target, len(split.loader))
    record["blocks"] = {name: b.as_setting() for name, b in uniform.items()}
    record["allocated"] = {name: b.as_setting() for name, b in allocated.items()}
    log.info("threshold calibration on %d %s images, target %.3g, %s: %s", split.images, split_name, target,
             allocation, ", ".join(f"{n} t={b.threshold:.4g} ({b.calibration_sparsity:.4f})"
                                   for n, b in allocated.items()))
    return record


def gathered_calibration(sharding: Sharding, detections: Path) -> dict:
    """The shard jobs' calibration (each shard calibrates on the same images, so they agree)."""
    found = shards.attached(sharding.partials_for(detections), CALIBRATION)
    if any(c != found[0] for c in found[1:]):
        raise ValueError(f"the shard jobs of {detections} calibrated different thresholds; rerun them on one machine")
    return found[0]


def scope_thresholds(calibration: dict, scope: str) -> dict[str, dict]:
    """Each block's calibrated setting as the scope uses it: allocated for all blocks, at the target for one."""
    return calibration["allocated" if scope == ALL_BLOCKS else "blocks"]


def calibration_setting(calibration: dict, scope: str, masked: list[str]) -> dict:
    """What a threshold row records of its calibration, for the blocks it masks."""
    blocks = scope_thresholds(calibration, scope)
    allocation = {"allocation": calibration["allocation"]} if scope == ALL_BLOCKS else {}
    return {"target": calibration["target"], **allocation, "calibration_split": calibration["split"],
            "calibration_images": calibration["images"],
            **{key: {name: blocks[name][field] for name in masked}
               for key, field in (("thresholds", "threshold"), ("calibration_sparsity", "calibration_sparsity"),
                                  ("calibration_natural_sparsity", "natural_sparsity"))}}


def scope_policies(method: str, keep_ratio: float, seed: int, blocks: list[str], calibration: dict | None):
    """The masking policies of each scope at one point of the sweep (a `PolicyFactory`: new objects per call): all
    blocks, or one block alone; the threshold oracle with its calibrated thresholds for that scope."""
    def policies_for(scope: str) -> dict:
        thresholds = ({n: b["threshold"] for n, b in scope_thresholds(calibration, scope).items()}
                      if calibration else None)
        return {name: masking_policy(method, keep_ratio, seed, name, thresholds)
                for name in (blocks if scope == ALL_BLOCKS else [scope])}

    return policies_for


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
    calibration, attach = None, None
    if method == "threshold":
        # A gather job runs no model: it takes the calibration the shard jobs attached to their partials.
        calibration = (gathered_calibration(sharding, detections / f"{ALL_BLOCKS}.json") if sharding.gathers
                       else calibration_record(cfg, detr, data, keep_ratio))
        if sharding.detects_shard:
            attach = lambda _detections: {CALIBRATION: calibration}  # noqa: E731
    scopes = [ALL_BLOCKS, *blocks]
    evaluated = evaluate_scopes(detr, split, scopes, scope_policies(method, keep_ratio, cfg.seed, blocks, calibration),
                                detections, check=attach)
    found, metrics = {}, {}
    for scope, measured in evaluated.items():
        if measured is None:  # a shard job: the scope's partial evaluation is written
            continue
        masked = blocks if scope == ALL_BLOCKS else [scope]
        if calibration is None:
            setting = {"keep_ratio": keep_ratio, "k": keep_count(keep_ratio, hidden), "scope": scope}
        else:  # no k: the number kept varies per token
            setting = {"keep_ratio": keep_ratio, "scope": scope, **calibration_setting(calibration, scope, masked)}
        row = {"method": method, "setting": setting, **measured, "mlflow_run_id": tracked.run_id}
        found[scope] = row
        metrics.update({f"{key}.{scope}": value for key, value in row_metrics(row).items()})
        log.info("%s keep %s%s on %s: AP %.4f AP50 %.4f, induced sparsity %.3f", method, keep_ratio,
                 f" (k={setting['k']})" if "k" in setting else "", scope, row["AP"], row["AP50"],
                 row["induced_sparsity"]["overall"])
    if not sharding.detects_shard:
        record_rows(tracked, rows, found, metrics)
