"""Per-block calibration (`mgs.calibration: per_block`): the sparsity target spread over the gated blocks where it
costs least, then levelled by the global bisection of `calibration`.

One global logit offset closes the same share of each block's gates only if every block's logits were alike;
they are not, and some blocks lose far more of their output than others for the same sparsity. So, as TEAL
allocates sparsity across layers, each block gets its own offset, chosen greedily on a held-out proxy:

1. One dense pass over the calibration images records each gated block's input on the real tokens.
2. Per block, a grid of logit offsets that close the shares `LEVELS` of the block's gates (quantiles of its
   logits); at each, the block's induced sparsity and its proxy cost, the relative error of the FFN output
   ||fc2(m * relu(fc1 x)) - fc2(relu(fc1 x))||^2 / ||fc2(relu(fc1 x))||^2, summed over the tokens.
3. Greedy: every block starts at its lowest-sparsity point; the block whose next point adds the least cost per
   unit of overall sparsity gained moves, until the overall sparsity reaches the target. Overall sparsity is
   slot-weighted (tokens x FFN width), as `calibration.gated_sparsity` measures it, so a block's share of the
   total is what its step is worth: the encoder blocks, holding most tokens, buy sparsity more cheaply.
4. The chosen offsets are folded into the gate biases; then the global bisection (`calibrate_gates`) runs on top,
   through the gated model, so that the sparsity with upstream gates in place meets the target: the allocation
   sets the shape, the global offset the level.

The proxy reads dense inputs (each block alone), which is why the level is set afterwards through the gated
model; the grid is per block because the same offset means different sparsities in different blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.mgs.block_inputs import BlockInputs, record_block_inputs
from detr_sparsity.mgs.calibration import calibrate_gates
from detr_sparsity.mgs.front_end import FrontEndCache
from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.models.front_end import cached_front_end
from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import ffn_blocks

log = logging.getLogger(__name__)

# Shares of a block's gate logits closed at the grid's points: 0, 0.05, ..., 0.95, then 0.99.
LEVELS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.99,)
CHUNK_TOKENS = 8192  # tokens per matrix product: bounds memory to a few (chunk, H) activations

CALIBRATION_MODES = ("global", "per_block")


@dataclass
class BlockCosts:
    """One block's grid: logit offsets (increasing), the induced sparsity and proxy cost at each, and its size."""

    offsets: list[float]
    sparsity: list[float]
    cost: list[float]
    tokens: int  # real tokens the proxy read
    hidden: int  # FFN width: a token's slots

    def __post_init__(self) -> None:
        if not (len(self.offsets) == len(self.sparsity) == len(self.cost) >= 1):
            raise ValueError(f"a block's grid needs as many offsets, sparsities and costs, at least one: "
                             f"{len(self.offsets)}, {len(self.sparsity)}, {len(self.cost)}")
        if any(b <= a for a, b in zip(self.sparsity, self.sparsity[1:])):
            raise ValueError(f"a block's grid must rise strictly in sparsity: {self.sparsity}")


@torch.no_grad()
def dense_block_inputs(model: DetrForObjectDetection, cache: FrontEndCache, index: list[int], batch_size: int
                       ) -> BlockInputs:
    """Every FFN block's dense input on the real tokens of the cached images (one transformer pass, no gates)."""
    model.eval()
    with cached_front_end(model) as front, record_block_inputs(model) as recording:
        for start in range(0, len(index), batch_size):
            batch = cache.batch(index[start:start + batch_size], model.device)
            model(**front.inputs(batch["features"], batch["mask"]))
    return recording.block_inputs()


def _grid_offsets(logits: torch.Tensor, cut: float, levels: tuple[float, ...]) -> list[float]:
    """Offsets closing about each share of `levels` of the logits: the cut falls midway between sorted logits."""
    values = logits.flatten().sort().values.double()
    n = values.numel()
    if n == 0:  # a block with no real tokens: one point, no offset
        return [0.0]
    offsets = []
    for level in levels:
        k = round(level * n)  # logits closed: those at or below cut + offset
        if k == 0:
            edge = values[0] - 1.0
        elif k == n:
            edge = values[-1] + 1.0
        else:
            edge = (values[k - 1] + values[k]) / 2
        offsets.append(float(edge) - cut)
    return offsets


@torch.no_grad()
def block_costs(block: nn.Module, gate: MicroGate, inputs: torch.Tensor, levels: tuple[float, ...] = LEVELS
                ) -> BlockCosts:
    """A block's grid on its dense inputs (n, d): sparsity and relative FFN-output error at each logit offset.

    Offsets are subtracted from the gate's logits, as `calibrate_gates` subtracts them from its bias. Points that
    close no more than the one before (tied logits) are dropped: each point of the grid adds sparsity.
    """
    device = block.fc1.weight.device
    gate = gate.eval()
    x_all = inputs.to(device)
    logits = torch.cat([gate(x_all[i:i + CHUNK_TOKENS]) for i in range(0, len(x_all), CHUNK_TOKENS)])
    cut = float(torch.logit(torch.tensor(gate.threshold, dtype=torch.float64)))  # p > threshold <=> logit > cut
    offsets = _grid_offsets(logits, cut, levels)
    closed = torch.zeros(len(offsets), dtype=torch.float64)
    error = torch.zeros(len(offsets), dtype=torch.float64)
    energy = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(x_all), CHUNK_TOKENS):
        x, chunk_logits = x_all[i:i + CHUNK_TOKENS], logits[i:i + CHUNK_TOKENS]
        activations = block.activation_fn(block.fc1(x))
        energy += block.fc2(activations).double().square().sum()
        for j, offset in enumerate(offsets):
            shut = ~gate.open_groups(chunk_logits - offset)
            closed[j] += int(shut.sum())
            # fc2(m a) - fc2(a) = -W2 ((1 - m) a): the bias cancels, and no difference of near-equal outputs.
            dropped = activations * shut.repeat_interleave(gate.group_size, dim=-1)
            error[j] += nn.functional.linear(dropped, block.fc2.weight).double().square().sum()
    slots = logits.numel()
    sparsity = (closed / slots).tolist() if slots else [0.0] * len(offsets)
    cost = (error / energy).tolist() if energy > 0 else [0.0] * len(offsets)
    keep = [j for j in range(len(offsets)) if j == 0 or sparsity[j] > max(sparsity[:j])]
    return BlockCosts(offsets=[offsets[j] for j in keep], sparsity=[sparsity[j] for j in keep],
                      cost=[cost[j] for j in keep], tokens=len(x_all), hidden=block.fc1.out_features)


def greedy_allocation(costs: Mapping[str, BlockCosts], target: float) -> dict[str, int]:
    """Grid point per block: from the lowest, repeatedly advance the block whose next point adds the least cost per
    unit of slot-weighted overall sparsity, until the overall sparsity reaches `target` (or no block can move).

    Ties go to the block first in block order, so the same costs always give the same allocation.
    """
    names = sorted(costs, key=block_order)
    slots = {name: costs[name].tokens * costs[name].hidden for name in names}
    total = sum(slots.values())
    if total == 0:
        return {name: 0 for name in names}
    share = {name: slots[name] / total for name in names}
    point = {name: 0 for name in names}

    def overall() -> float:
        return sum(share[n] * costs[n].sparsity[point[n]] for n in names)

    while overall() < target:
        best, best_rate = None, None
        for name in names:
            c, j = costs[name], point[name]
            if j + 1 >= len(c.sparsity) or share[name] == 0:
                continue
            rate = (c.cost[j + 1] - c.cost[j]) / (share[name] * (c.sparsity[j + 1] - c.sparsity[j]))
            if best_rate is None or rate < best_rate:
                best, best_rate = name, rate
        if best is None:
            break
        point[best] += 1
    return point


def calibrate_gates_per_block(model: DetrForObjectDetection, gates: Mapping[str, MicroGate], cache: FrontEndCache,
                              index: list[int], target: float, batch_size: int, tolerance: float = 1e-3,
                              iterations: int = 20, levels: tuple[float, ...] = LEVELS) -> dict:
    """Per-block offsets allocated greedily on the dense proxy and folded into the gate biases, then one global
    offset bisected through the gated model (`calibrate_gates`) so that the held-out induced sparsity is `target`.

    The record: the global bisection's keys (its `offset` is the one on top of the per-block ones), `allocation`
    per block (offset, allocated sparsity, proxy cost, tokens), the allocated overall sparsity, and `seconds` in all.
    """
    start = time.perf_counter()
    for gate in gates.values():
        gate.eval()
    inputs = dense_block_inputs(model, cache, index, batch_size)
    blocks = ffn_blocks(model)
    costs = {name: block_costs(blocks[name], gate, inputs.inputs[name], levels) for name, gate in gates.items()}
    del inputs
    point = greedy_allocation(costs, target)
    slots = sum(c.tokens * c.hidden for c in costs.values())
    allocated = sum(c.tokens * c.hidden * c.sparsity[point[n]] for n, c in costs.items()) / slots if slots else 0.0
    allocation = {}
    for name in sorted(gates, key=block_order):
        c, j = costs[name], point[name]
        gates[name].gate.bias.data -= c.offsets[j]
        allocation[name] = {"offset": c.offsets[j], "sparsity": c.sparsity[j], "cost": c.cost[j], "tokens": c.tokens}
    allocation_seconds = time.perf_counter() - start
    log.info("per-block allocation toward %.2f (proxy sparsity %.4f, %.1f s): %s", target, allocated,
             allocation_seconds, ", ".join(f"{n} {a['sparsity']:.2f} (cost {a['cost']:.3g})"
                                           for n, a in allocation.items()))
    record = calibrate_gates(model, gates, cache, index, target, batch_size, tolerance, iterations)
    return {**record, "allocation": allocation, "allocated_sparsity": allocated, "levels": list(levels),
            "allocation_seconds": allocation_seconds, "seconds": time.perf_counter() - start}


def calibrate(mode: str, model: DetrForObjectDetection, gates: Mapping[str, MicroGate], cache: FrontEndCache,
              index: list[int], target: float, batch_size: int, **kwargs) -> dict:
    """Calibrate `gates` to `target` as params.yaml's `mgs.calibration` says; the record names its mode."""
    if mode == "global":
        record = calibrate_gates(model, gates, cache, index, target, batch_size, **kwargs)
    elif mode == "per_block":
        record = calibrate_gates_per_block(model, gates, cache, index, target, batch_size, **kwargs)
    else:
        raise ValueError(f"mgs.calibration = {mode!r} is not allowed: one of {', '.join(CALIBRATION_MODES)}")
    return {"mode": mode, **record}
