"""Reading the study's record (summary.json and the stage outputs beside it) for the figures and tables.

Every number a figure or table shows comes through here from a file the pipeline wrote; nothing is typed in.
Kept free of torch, so that the reporting stages start fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from detr_sparsity.sparsity.blocks import ALL_BLOCKS, block_order

METHOD_LABELS = {"dense": "dense", "topk": "top-k (oracle)", "threshold": "threshold (oracle)", "random": "random",
                 "sibs": "SIBS", "mgs": "MGS"}


def mgs_label(objective: str) -> str:
    return f"MGS ({objective})"


@dataclass(frozen=True)
class StudyRecord:
    """The rows of summary.json, with the selections the figures and tables need."""

    rows: list[dict]

    @classmethod
    def load(cls, summary_path: Path) -> "StudyRecord":
        return cls(json.loads(Path(summary_path).read_text()))

    @property
    def dense(self) -> dict:
        found = [r for r in self.rows if r["method"] == "dense"]
        if len(found) != 1:
            raise ValueError(f"summary.json holds {len(found)} dense rows; the reporting needs exactly one")
        return found[0]

    @property
    def blocks(self) -> list[str]:
        return sorted(self.dense["natural_sparsity"]["per_block"], key=block_order)

    def masking(self, method: str, scope: str = ALL_BLOCKS) -> list[dict]:
        """The masking sweep of one method and scope, by increasing induced sparsity (keep-ratio 1 first)."""
        rows = [r for r in self.rows if r["method"] == method and r["setting"]["scope"] == scope]
        return sorted(rows, key=lambda r: -r["setting"]["keep_ratio"])

    def sibs(self) -> list[dict]:
        return sorted((r for r in self.rows if r["method"] == "sibs"), key=lambda r: r["setting"]["threshold"])

    def mgs_objectives(self) -> list[str]:
        seen: list[str] = []
        for r in self.rows:
            if r["method"] == "mgs" and r["setting"]["objective"] not in seen:
                seen.append(r["setting"]["objective"])
        return seen

    def mgs(self, objective: str) -> list[dict]:
        """The objective's gate sets with every gated block at once, by target."""
        rows = [r for r in self.rows if r["method"] == "mgs" and r["setting"]["objective"] == objective
                and r["setting"].get("protocol", "all") == "all"]
        return sorted(rows, key=lambda r: r["setting"]["target"])

    def mgs_single(self, block: str) -> list[dict]:
        """The group_activity gate of one block alone (the others dense), by target."""
        rows = [r for r in self.rows if r["method"] == "mgs" and r["setting"].get("protocol") == "single"
                and r["setting"]["scope"] == block]
        return sorted(rows, key=lambda r: r["setting"]["target"])

    def retention(self, row: dict) -> float:
        """AP as a fraction of the dense AP."""
        return row["AP"] / self.dense["AP"]


def sparsity(row: dict, scope: str = "overall") -> float:
    """Induced sparsity of a row: overall (token-weighted over every block) or of one block."""
    measure = row["induced_sparsity"]
    return measure["overall"] if scope in ("overall", ALL_BLOCKS) else measure["per_block"][scope]


def flops_ratio(row: dict, kind: str = "ffn_flops") -> float:
    """FLOPs as run over dense FLOPs (gate cost included), `ffn_flops` or `total_flops`."""
    return row[kind]["as_run"] / row[kind]["dense"]


def flops_reduction(row: dict, kind: str = "ffn_flops") -> float:
    """1 - FLOPs as run / dense FLOPs: the share of the dense work the method saves."""
    return 1.0 - flops_ratio(row, kind)
