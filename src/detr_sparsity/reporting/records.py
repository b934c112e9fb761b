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
        """The objectives with gate sets over every gated block at once, in record order."""
        seen: list[str] = []
        for r in self.rows:
            if r["method"] == "mgs" and protocol(r) == "all" and r["setting"]["objective"] not in seen:
                seen.append(r["setting"]["objective"])
        return seen

    def mgs(self, objective: str) -> list[dict]:
        """The objective's gate sets with every gated block at once, by target."""
        rows = [r for r in self.rows if r["method"] == "mgs" and r["setting"]["objective"] == objective
                and protocol(r) == "all"]
        return sorted(rows, key=lambda r: r["setting"]["target"])

    def mgs_paper_setting(self) -> list[dict]:
        """The row in the paper's own setting (stage `mgs_paper_setting`), if the study has it."""
        return [r for r in self.rows if r["method"] == "mgs" and protocol(r) == "paper"]

    def mgs_single(self, block: str) -> list[dict]:
        """The group_activity gate of one block alone (the others dense), by target."""
        rows = [r for r in self.rows if r["method"] == "mgs" and protocol(r) == "single"
                and r["setting"]["scope"] == block]
        return sorted(rows, key=lambda r: r["setting"]["target"])

    def single_blocks(self) -> list[str]:
        """The blocks gated alone (single-block protocol), in model order."""
        return sorted({r["setting"]["scope"] for r in self.rows if r["method"] == "mgs" and protocol(r) == "single"},
                      key=block_order)

    def single_targets(self) -> list[float]:
        return sorted({r["setting"]["target"] for r in self.rows if r["method"] == "mgs" and protocol(r) == "single"})

    def retention(self, row: dict) -> float:
        """AP as a fraction of the dense AP."""
        return row["AP"] / self.dense["AP"]


def protocol(row: dict) -> str:
    """An MGS row's protocol: `all` (every gated block at once), `single` (one block, the others dense) or `paper`
    (the paper's own setting: every block, uncalibrated); rows
    written before the single-block protocol existed have none and are `all`."""
    return (row["setting"] or {}).get("protocol", ALL_BLOCKS)


def comparison_key(description: dict) -> tuple:
    """What identifies a compared row, from `reporting.comparisons.describe`'s description or a row's own: an
    oracle by its keep-ratio (target 1 - keep-ratio) and scope, an MGS gate set by objective, protocol, target
    and scope; rows without protocol or scope are `all`."""
    method = description["method"]
    if method == "dense":
        return (method,)
    scope = description.get("scope", ALL_BLOCKS)
    if method == "mgs":
        return (method, description["objective"], description.get("protocol", ALL_BLOCKS),
                None if description["target"] is None else round(description["target"], 9), scope)
    if "keep_ratio" in description:
        return (method, round(1.0 - description["keep_ratio"], 9), scope)
    return (method, *sorted(description.items()))  # a method never compared (SIBS): a key of its own


def describe(row: dict) -> dict:
    """A row as comparisons.json describes it (the keys `comparison_key` reads)."""
    setting = row["setting"] or {}
    return {"method": row["method"], **{k: setting[k] for k in ("objective", "protocol", "target", "scope",
                                                                 "keep_ratio") if k in setting}}


@dataclass(frozen=True)
class Comparisons:
    """comparisons.json (the summary stage's paired bootstrap intervals), looked up by the rows compared."""

    level: float
    resamples: int
    images: int
    entries: dict[tuple, dict]

    @classmethod
    def of(cls, found: dict | None) -> "Comparisons":
        """From the file's content; None (no comparisons computed) gives one without entries."""
        if found is None:
            return cls(0.95, 0, 0, {})
        entries = {(c["kind"], comparison_key(c["row"]), comparison_key(c["reference"])): c
                   for c in found["comparisons"]}
        return cls(found["level"], found["resamples"], found["images"], entries)

    @classmethod
    def load(cls, path: Path) -> "Comparisons":
        return cls.of(json.loads(Path(path).read_text()))

    def retention(self, row: dict) -> dict | None:
        """The row against the dense row (AP_ratio, AP_ratio_low, ...), or None where not computed."""
        return self.entries.get(("retention", comparison_key(describe(row)), ("dense",)))

    def against_oracle(self, row: dict, oracle: str) -> dict | None:
        """An MGS row against the oracle `oracle` at its target and scope (AP_difference, ...), or None."""
        if row["method"] != "mgs":
            return None
        key = comparison_key(describe(row))
        target, scope = key[3], key[4]
        return self.entries.get(("against_oracle", key, (oracle, target, scope)))


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
