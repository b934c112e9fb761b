"""Stage `summary`: gather every evaluation's row file into results/<study>/summary.json, and the headline
numbers of each configuration into results/<study>/metrics.json (DVC's metrics file: compact enough for
`dvc metrics show` and `dvc exp show`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig
from detr_sparsity.sparsity.blocks import ALL_BLOCKS, scope_order
from detr_sparsity.evaluation.coco_eval import AP_METRICS

log = logging.getLogger(__name__)

REQUIRED = ("method", "setting", *AP_METRICS, "natural_sparsity", "induced_sparsity", "ffn_flops",
            "total_flops", "detections", "annotations", "mlflow_run_id")


def row_files(cfg: StudyConfig) -> list[Path]:
    """Every evaluated configuration's row file, in summary order: dense, the masking sweep, the SIBS sweep,
    the MGS objectives and targets.

    The paths are the outputs of the rules in workflow/rules (Snakemake fails on a path no rule makes).
    """
    results = cfg.results_dir
    return [
        results / "evaluate" / "dense" / "row.json",
        *(results / "masking" / f"{method}-{keep}" / "rows.json"
          for method in cfg.masking["methods"] for keep in cfg.masking["keep_ratios"]),
        *(results / "sibs" / str(threshold) / "row.json" for threshold in cfg.sibs["thresholds"]),
        *(results / "mgs" / objective / str(target) / "row.json"
          for objective in cfg.mgs["objectives"] for target in cfg.mgs["targets"]),
    ]


def headline_metrics(rows: list[dict]) -> dict:
    """AP, AP50, induced sparsity and FFN FLOPs ratio per configuration, nested by method and setting (masking
    rows: the all-blocks scope only)."""
    found: dict = {}
    for row in rows:
        setting = row["setting"] or {}
        if row["method"] in ("topk", "random"):
            if setting["scope"] != ALL_BLOCKS:
                continue
            keys = [row["method"], f"keep={setting['keep_ratio']:g}"]
        elif row["method"] == "sibs":
            keys = ["sibs", f"tau={setting['threshold']:g}"]
        elif row["method"] == "mgs":
            keys = ["mgs", setting["objective"], f"target={setting['target']:g}"]
        else:
            keys = [row["method"]]
        node = found
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = {"AP": row["AP"], "AP50": row["AP50"],
                          "induced_sparsity": row["induced_sparsity"]["overall"],
                          "ffn_flops_ratio": row["ffn_flops"]["as_run"] / row["ffn_flops"]["dense"]}
    return found


def gather(row_paths: list[Path], out_path: Path) -> list[dict]:
    """One list of rows, in the given order; a row missing a field of the record is an error.

    A row file holds one row (an evaluation) or rows keyed by scope (a masking point: `all` and each block).
    """
    rows = []
    for path in row_paths:
        found = json.loads(Path(path).read_text())
        for row in [found] if "method" in found else [found[scope] for scope in sorted(found, key=scope_order)]:
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"row file {path} lacks field(s) {', '.join(missing)}")
            rows.append(row)
    write_json(out_path, rows)
    log.info("gathered %d row(s) into %s", len(rows), out_path)
    return rows
