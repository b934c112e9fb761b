"""The paper's MGS objective, `group_activity`, trained layer-locally.

A group of G hidden neurons of an FFN block is *active* for a token when any of its neurons fires:
label = 1[max over the group of relu(fc1 x) > 0], from the block's dense input x. Each block's gate learns to
predict these natural labels from the same x, by binary cross-entropy on its logits (STUDY.md, Methods, MGS).

Layer-local: the labels and the gate's input both come from the block's own cached dense input, so a step
passes through nothing else (no backbone, no attention, no other block, no loss of DETR's), and every block's
gate trains at the cost of one fc1 product on a batch of tokens. The labels do not depend on the sparsity
target either, so one gate set is trained per study; each target is then a calibration of the gates'
thresholds on held-out data (see `calibration`), not a new training run.

`pos_weight` weighs the positive labels in the loss. How many labels are positive depends on the model: a
group is inactive only when all G of its neurons are, so on the small stand-in DETR nearly every label is 1,
and unweighted the gate would learn to keep every group open; on DETR-R50 the share is lower. One weight
balances the two classes (negatives / positives), or favours recall (a weight above that).

The labels are recomputed from fc1 when training starts, never stored in the cache, so they always come from
the fc1 at hand. They are computed once per cached token (chunked, one bit per group) rather than once per
draw: an fc1 product has G times the gate's outputs, and recomputing it for every batch made it the largest
cost of a step by far (measured: about 5x the gate's forward and backward together). There is no checkpoint: training takes seconds to minutes on the cached tensors, and a rerun
with the same seed repeats it exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from detr_sparsity.mgs.gates import MicroGate

log = logging.getLogger(__name__)

StepLogger = Callable[[int, dict[str, float]], None]
CURVE_POINTS = 200  # steps of the training curve kept in the record (every step goes to `log_step`)
EVALUATIONS = 10  # held-out precision and recall this many times in a run, and at its end
EVAL_TOKENS = 8192  # tokens per chunk when counting over a whole block (bounds the (tokens, H) product)


@torch.no_grad()
def group_labels(fc1: nn.Linear, inputs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Natural group activity, (tokens, H/G) bool: 1 when any of the group's G neurons has relu(fc1 x) > 0."""
    if group_size < 1 or fc1.out_features % group_size:
        raise ValueError(f"group_size = {group_size} is not allowed: must divide the FFN width {fc1.out_features}")
    # relu(z) > 0 exactly when z > 0, so the ReLU itself is not needed.
    return fc1(inputs).unflatten(-1, (-1, group_size)).amax(-1) > 0


@dataclass(frozen=True)
class LocalTraining:
    """Settings of layer-local `group_activity` training."""

    steps: int = 2000
    batch_tokens: int = 4096  # tokens per block per step, drawn with replacement from the training tokens
    learning_rate: float = 1e-2
    pos_weight: float = 1.0  # BCE weight of the positive (active) labels
    held_out: float = 0.1  # fraction of the images held out of training for precision and recall

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} = {value!r} is not allowed: must be a whole number >= 1")
        for name in ("learning_rate", "pos_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} = {value!r} is not allowed: must be a finite number > 0")
        if not _is_number(self.held_out) or not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out = {self.held_out!r} is not allowed: must be a fraction of the images "
                             f"strictly between 0 and 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def held_out_images(images: Mapping[str, torch.Tensor], fraction: float, seed: int) -> torch.Tensor:
    """The image ids held out of training (sorted), chosen from the seed among every block's images; at least
    one is held out and at least one is left for training."""
    ids = torch.unique(torch.cat([index.detach().cpu() for index in images.values()]))
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} image(s) in the cached inputs: held-out precision and recall need at "
                         f"least 2 (one to train on, one to hold out)")
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return ids[order[:count]].sort().values


def train_group_activity(gates: Mapping[str, MicroGate], fc1: Mapping[str, nn.Linear],
                         inputs: Mapping[str, torch.Tensor], images: Mapping[str, torch.Tensor],
                         settings: LocalTraining, seed: int, log_step: StepLogger | None = None) -> dict:
    """Train every gate in place, one Adam over all of them, on its block's cached dense inputs (`inputs[name]`,
    (n, d) float32; `images[name]`, (n,) int64, the image of each token); fc1 never changes.

    Returns the record: per block (`blocks[name]`) the share of (token, group) labels that are positive over
    all its tokens (`positive_rate`), held-out `precision`, `recall` and `open_rate` of the open groups at the
    end, its last batch's `loss` and its `train_tokens` / `held_out_tokens`; the same pooled over the blocks;
    the last step's `loss`, `steps`, the `held_out_images` ids, `train_seconds` and the `curve` (the step
    metrics at up to about 200 evenly spaced steps). `log_step(step, metrics)` gets every step's `loss` and
    `loss.<block>`, and at about every tenth of the steps and at the last `precision`, `recall`,
    `open_rate` and their `.<block>` values."""
    start = time.perf_counter()
    _check_blocks(gates, fc1, inputs, images)
    names = list(gates)
    held = held_out_images({name: images[name] for name in names}, settings.held_out, seed)
    train_index, held_index = {}, {}
    for name in names:
        is_held = torch.isin(images[name].detach().cpu(), held)
        train_index[name] = (~is_held).nonzero().squeeze(1)
        held_index[name] = is_held.nonzero().squeeze(1)
        for part, index in (("training", train_index[name]), ("held-out", held_index[name])):
            if len(index) == 0:
                raise ValueError(f"block {name} has no tokens of the {part} images ({len(held)} of the images held "
                                 f"out, held_out = {settings.held_out}): every gated block needs tokens of both")
    frozen = {name: [p.detach().clone() for p in fc1[name].parameters()] for name in names}

    labelled = {name: _all_labels(fc1[name], inputs[name], gates[name].group_size) for name in names}
    positive = {name: int(labelled[name].sum()) for name in names}
    blocks = {name: {"train_tokens": len(train_index[name]), "held_out_tokens": len(held_index[name]),
                     "positive_rate": positive[name] / (len(inputs[name]) * gates[name].groups)} for name in names}
    log.info("layer-local group_activity training of %d gates: %d steps of %d tokens per block; %d images held "
             "out; positive labels: %s", len(names), settings.steps, settings.batch_tokens, len(held),
             ", ".join(f"{name} {blocks[name]['positive_rate']:.3f}" for name in names))

    params = [p for gate in gates.values() for p in gate.parameters()]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    pos_weight = {name: torch.tensor(settings.pos_weight, device=inputs[name].device) for name in names}
    # Its own stream, so the batches drawn do not depend on how the held-out images were chosen.
    generator = torch.Generator().manual_seed(seed + 1)
    curve_every = math.ceil(settings.steps / CURVE_POINTS)
    evaluate_every = math.ceil(settings.steps / EVALUATIONS)
    curve: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    for gate in gates.values():
        gate.train()
    progress = tqdm(total=settings.steps, desc="gates group_activity", mininterval=10)
    for step in range(1, settings.steps + 1):
        losses = {}
        for name in names:
            draw = torch.randint(len(train_index[name]), (settings.batch_tokens,), generator=generator)
            chosen = train_index[name][draw].to(inputs[name].device)
            batch, labels = inputs[name][chosen], labelled[name][chosen]
            losses[name] = F.binary_cross_entropy_with_logits(gates[name](batch), labels.to(batch.dtype),
                                                              pos_weight=pos_weight[name])
        per_block = torch.stack([losses[name] for name in names])
        loss = per_block.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = per_block.detach().tolist()  # one read from the device per step, not one per block
        metrics = {"loss": sum(values) / len(values), **{f"loss.{name}": v for name, v in zip(names, values)}}
        if step % evaluate_every == 0 or step == settings.steps:
            metrics.update(_held_out_metrics(gates, fc1, inputs, held_index))
            log.info("step %d/%d: loss %.4f, held-out precision %.3f, recall %.3f, open groups %.3f", step,
                     settings.steps, metrics["loss"], metrics["precision"], metrics["recall"], metrics["open_rate"])
        if log_step is not None:
            log_step(step, metrics)
        if step % curve_every == 0 or step == settings.steps:
            curve.append({"step": step, **metrics})
        progress.update(1)
    progress.close()
    for gate in gates.values():
        gate.eval()
    for name in names:
        if not all(torch.equal(before, after) for before, after in zip(frozen[name], fc1[name].parameters())):
            raise RuntimeError(f"group_activity training changed fc1 of block {name}; only the gates may train")

    for name in names:
        blocks[name].update({key: metrics[f"{key}.{name}"] for key in ("precision", "recall", "open_rate")})
        blocks[name]["loss"] = metrics[f"loss.{name}"]
    slots = sum(len(inputs[name]) * gates[name].groups for name in names)
    return {"loss": metrics["loss"], "precision": metrics["precision"], "recall": metrics["recall"],
            "open_rate": metrics["open_rate"], "positive_rate": sum(positive.values()) / slots,
            "steps": settings.steps, "held_out_images": held.tolist(), "blocks": blocks,
            "train_seconds": time.perf_counter() - start, "curve": curve}


def _check_blocks(gates: Mapping[str, MicroGate], fc1: Mapping[str, nn.Linear], inputs: Mapping[str, torch.Tensor],
                  images: Mapping[str, torch.Tensor]) -> None:
    if not gates:
        raise ValueError("no gates to train: at least one gated block is needed")
    for name, gate in gates.items():
        for what, source in (("fc1", fc1), ("inputs", inputs), ("images", images)):
            if name not in source:
                raise ValueError(f"block {name} has a gate but no {what}; {what} holds {', '.join(source) or 'none'}")
        layer, x, index = fc1[name], inputs[name], images[name]
        if x.ndim != 2 or x.dtype != torch.float32 or x.shape[1] != layer.in_features:
            raise ValueError(f"inputs of block {name} are {tuple(x.shape)} {x.dtype}; allowed: (tokens, "
                             f"{layer.in_features}) float32, the width of its fc1")
        if index.shape != (len(x),) or index.dtype != torch.int64:
            raise ValueError(f"images of block {name} are {tuple(index.shape)} {index.dtype}; allowed: "
                             f"({len(x)},) int64, one image id per token")
        if (gate.gate.in_features, gate.groups * gate.group_size) != (layer.in_features, layer.out_features):
            raise ValueError(f"the gate of block {name} is for d = {gate.gate.in_features}, H = "
                             f"{gate.groups * gate.group_size}; its fc1 has d = {layer.in_features}, "
                             f"H = {layer.out_features}")
        devices = {x.device, layer.weight.device, gate.gate.weight.device}
        if len(devices) > 1:
            raise ValueError(f"block {name}: inputs, fc1 and gate must be on one device, not "
                             f"{', '.join(sorted(map(str, devices)))}")


@torch.no_grad()
def _all_labels(fc1: nn.Linear, inputs: torch.Tensor, group_size: int) -> torch.Tensor:
    """The labels of every token of a block, chunked to bound the (tokens, H) product."""
    return torch.cat([group_labels(fc1, inputs[i:i + EVAL_TOKENS], group_size)
                      for i in range(0, len(inputs), EVAL_TOKENS)])



@torch.no_grad()
def _held_out_metrics(gates: Mapping[str, MicroGate], fc1: Mapping[str, nn.Linear],
                      inputs: Mapping[str, torch.Tensor], held_index: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Precision and recall of the open groups on the held-out tokens, per block and pooled over blocks; a
    precision with nothing open and a recall with nothing active are 1 (nothing wrongly opened or missed)."""
    metrics, totals = {}, torch.zeros(4, dtype=torch.int64)
    for name, gate in gates.items():
        counts = torch.zeros(4, dtype=torch.int64)  # true positives, open, positives, (token, group) pairs
        index = held_index[name].to(inputs[name].device)
        for i in range(0, len(index), EVAL_TOKENS):
            x = inputs[name][index[i:i + EVAL_TOKENS]]
            labels, opened = group_labels(fc1[name], x, gate.group_size), gate.open_groups(gate(x))
            counts += torch.stack([(labels & opened).sum(), opened.sum(), labels.sum(),
                                   torch.tensor(labels.numel(), device=labels.device)]).cpu()
        totals += counts
        metrics.update({f"{key}.{name}": value for key, value in _rates(counts).items()})
    return {**_rates(totals), **metrics}


def _rates(counts: torch.Tensor) -> dict[str, float]:
    hits, opened, positives, pairs = counts.tolist()
    return {"precision": hits / opened if opened else 1.0, "recall": hits / positives if positives else 1.0,
            "open_rate": opened / pairs}
