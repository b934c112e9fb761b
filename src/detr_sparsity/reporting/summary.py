"""The study's record: every evaluation's rows in one list (summary.json), and the headline numbers of each
configuration (metrics.json, DVC's metrics file: compact enough for `dvc metrics show` and `dvc exp show`)."""

from __future__ import annotations

import json
from pathlib import Path

from detr_sparsity.sparsity.blocks import ALL_BLOCKS, scope_order
from detr_sparsity.evaluation.coco_eval import AP_METRICS

REQUIRED = ("method", "setting", *AP_METRICS, "natural_sparsity", "induced_sparsity", "ffn_flops",
            "total_flops", "detections", "annotations", "mlflow_run_id")


def headline_metrics(rows: list[dict]) -> dict:
    """AP, AP50, induced sparsity and FFN FLOPs ratio per configuration, nested by method and setting (masking
    rows: the all-blocks scope only)."""
    found: dict = {}
    for row in rows:
        setting = row["setting"] or {}
        if "keep_ratio" in setting:  # a masking row (top-k, random, threshold): one per scope
            if setting["scope"] != ALL_BLOCKS:
                continue
            keys = [row["method"], f"keep={setting['keep_ratio']:g}"]
        elif row["method"] == "sibs":
            keys = ["sibs", f"tau={setting['threshold']:g}"]
        elif row["method"] == "mgs" and setting.get("protocol") == "paper":
            keys = ["mgs", "paper_setting"]
        elif row["method"] == "mgs" and setting.get("protocol") == "single":
            keys = ["mgs", f"{setting['objective']}-single", f"target={setting['target']:g}", setting["scope"]]
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


def read_rows(row_paths: list[Path]) -> list[dict]:
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
    return rows
