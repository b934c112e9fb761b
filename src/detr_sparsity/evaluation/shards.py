"""Sharded evaluation: the evaluation split's batches dealt out to N detection jobs, merged by one gather job.

A shard is a contiguous run of whole batches, so each of its batches is exactly a batch an unsharded job runs
(same images, same padding, same arithmetic). A shard job writes a *partial evaluation* where the unsharded job
writes its detections: the shard's detections plus the integer counts the measures are made of (FFN counters
and FLOPs per module). The gather job concatenates the detections in shard order and sums the counts, then
scores and measures them with the same code as an unsharded job, which runs COCOeval once over the whole split.
Detections, AP, sparsity and FLOPs therefore equal the unsharded job's exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from detr_sparsity.atomic import write_json
from detr_sparsity.evaluation.flops import FlopCount
from detr_sparsity.sparsity.ffn import BlockCounts, FFNSparsity

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "detr-sparsity partial evaluation v1"


@dataclass(frozen=True)
class Sharding:
    """How one evaluation job shares its split: the whole split (default), one shard of it, or a gather."""

    index: int = 1  # 1-based: shard `index` of `count`
    count: int = 1
    gather: tuple[Path, ...] = ()  # the shard jobs' detections outputs, in shard order (gather job)
    output: Path | None = None  # the gather job's own detections output (file or directory); see partials_for

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count} is not allowed: the shard must be in 1..{self.count}")
        if self.gather and self.count != 1:
            raise ValueError("a job either detects one shard or gathers all of them, not both")
        if self.gather and self.output is None:
            raise ValueError("a gather job needs its own detections output to find each shard's partials")

    @property
    def detects_shard(self) -> bool:
        """This job runs part of the split and writes partial evaluations, no rows."""
        return self.count > 1

    @property
    def gathers(self) -> bool:
        return bool(self.gather)

    def describe(self) -> str:
        if self.gathers:
            return f"gathering {len(self.gather)} shards"
        return f"shard {self.index} of {self.count}" if self.detects_shard else "the whole split"

    def partials_for(self, detections_path: Path) -> list[Path]:
        """Each shard's partial evaluation for the detections a gather job writes at `detections_path`.

        A stage writes one detections file (its output itself) or several inside its output directory (masking:
        one per scope); the shard jobs wrote theirs at the same place relative to their own outputs.
        """
        relative = Path(detections_path).relative_to(self.output)
        return [Path(root) / relative for root in self.gather]


WHOLE_SPLIT = Sharding()


def parse_shard(text: str) -> Sharding:
    """'2/3' -> shard 2 of 3, with a clear error for anything else."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not allowed: expected K/N with integers 1 <= K <= N, e.g. 2/3") from None
    if count < 1:
        raise ValueError(f"--shard {text!r} is not allowed: N must be >= 1")
    return Sharding(index, count)


def shard_batches(batches: int, sharding: Sharding) -> range:
    """The batch indices of one shard: contiguous, sizes differing by at most one (a shard may be empty when
    there are fewer batches than shards)."""
    start = (sharding.index - 1) * batches // sharding.count
    stop = sharding.index * batches // sharding.count
    return range(start, stop)


def write_partial(path: Path, detections: list[dict], flops: FlopCount, sparsity: FFNSparsity,
                  attached: dict[str, Any]) -> None:
    """A shard's partial evaluation: its detections, the counts the measures are computed from, and a stage's
    own per-shard results (`attached`, e.g. SIBS's shrunk-FFN check)."""
    counts = {name: {f.name: int(getattr(w.counts, f.name)) for f in dataclasses.fields(BlockCounts)}
              for name, w in sparsity.blocks.items()}
    write_json(path, {"format": PARTIAL_FORMAT, "detections": detections, "images": flops.images,
                      "module_flops": flops.module_flops, "ffn_counts": counts, "attached": attached}, indent=None)


def read_partial(path: Path) -> dict:
    partial = json.loads(Path(path).read_text())
    if not isinstance(partial, dict) or partial.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"{path} is not a shard's partial evaluation (run the shard jobs with --shard K/N)")
    return partial


def attached(paths: Iterable[Path], key: str) -> list[Any]:
    """One attached result per shard, in shard order."""
    return [read_partial(p)["attached"][key] for p in paths]


def gather_partials(paths: list[Path], flops: FlopCount, sparsity: FFNSparsity) -> list[dict]:
    """Merge shards' partial evaluations into `flops` and the (not yet counted) `sparsity` wrappers; return the
    detections of all shards in shard order, i.e. in the unsharded job's order."""
    detections: list[dict] = []
    totals = {name: dict.fromkeys((f.name for f in dataclasses.fields(BlockCounts)), 0) for name in sparsity.blocks}
    module_flops: dict[str, int] = {}
    for path in paths:
        partial = read_partial(path)
        if set(partial["ffn_counts"]) != set(totals):
            raise ValueError(f"{path} counts blocks {sorted(partial['ffn_counts'])}, the model has {sorted(totals)}")
        detections += partial["detections"]
        flops.images += partial["images"]
        for module, value in partial["module_flops"].items():
            module_flops[module] = module_flops.get(module, 0) + value
        for name, counts in partial["ffn_counts"].items():
            for key, value in counts.items():
                totals[name][key] += value
    flops.module_flops = module_flops
    for name, wrapper in sparsity.blocks.items():
        wrapper.counts = BlockCounts(**totals[name])
    log.info("gathered %d shards: %d images, %d detections", len(paths), flops.images, len(detections))
    return detections
