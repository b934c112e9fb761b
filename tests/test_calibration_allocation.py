"""Per-block calibration (`mgs.calibration: per_block`) on a small random DETR: the proxy cost, the greedy
allocation and the level the global bisection sets on top, each against a recount or a known answer."""

from __future__ import annotations

import pytest
import torch

from detr_sparsity.mgs.allocation import (BlockCosts, block_costs, calibrate, calibrate_gates_per_block,
                                          dense_block_inputs, greedy_allocation)
from detr_sparsity.mgs.calibration import gated_sparsity
from detr_sparsity.mgs.front_end import build_front_end_cache
from detr_sparsity.mgs.gates import MicroGate, make_gates
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns

from tiny_detr import D, G, H, batches, tiny_detr


@pytest.fixture()
def model():
    return tiny_detr()


def random_gates(model, names=None, seed=2):
    """Gates with random weights, so that their logits are spread and differ per token."""
    blocks = ffn_blocks(model)
    gates = make_gates(blocks, names or list(blocks), G, 0.5)
    generator = torch.Generator().manual_seed(seed)
    for gate in gates.values():
        gate.gate.weight.data = torch.randn(gate.gate.weight.shape, generator=generator) * 0.5
        gate.gate.bias.data = torch.randn(gate.gate.bias.shape, generator=generator)
    return {name: gate.eval() for name, gate in gates.items()}


def make_cheap_to_close(block, gate: MicroGate, closable: int) -> None:
    """Give the block `closable` groups whose output weights are tiny, and the gate a bias that closes them first:
    up to that share of its groups, the block loses almost nothing of its output."""
    with torch.no_grad():
        block.fc2.weight.view(D, H // G, G)[:, :closable] *= 1e-3
        gate.gate.weight.mul_(0.01)
        gate.gate.bias.copy_(torch.tensor([-5.0] * closable + [5.0] * (H // G - closable)))


# ---------------------------------------------------------------- the proxy cost

def test_proxy_cost_and_sparsity_of_a_block_match_a_hand_recount(model):
    data = batches(padded=False)  # every token real: a plain hook on the block sees exactly the recorded inputs
    cache = build_front_end_cache(model, data)
    inputs = dense_block_inputs(model, cache, list(range(len(cache))), batch_size=4)
    name = "encoder.1"
    block, gate = ffn_blocks(model)[name], random_gates(model, [name])[name]
    seen = []
    hook = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, D)))
    with torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    hook.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(inputs.inputs[name], x, rtol=0, atol=1e-5)
    costs = block_costs(block, gate, inputs.inputs[name])
    assert costs.tokens == x.shape[0] == int(cache.shapes.prod(1).sum()) and costs.hidden == H
    assert costs.sparsity[0] == 0.0 and costs.cost[0] == 0.0
    assert len(costs.sparsity) == 21  # distinct random logits: every grid level is its own point
    w1, b1, w2, b2 = (p.detach().double() for p in (block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias))
    for j in (1, 6, 14, 18, 20):
        shifted = MicroGate(D, H, G).eval()
        shifted.gate.weight.data = gate.gate.weight.detach().clone()
        shifted.gate.bias.data = gate.gate.bias.detach() - costs.offsets[j]
        with torch.no_grad():
            keep = shifted.mask(x, None).double()  # the gate's own decision, with the offset in its bias
        hidden = torch.relu(x.double() @ w1.T + b1)
        dense = hidden @ w2.T + b2
        sparse = (keep * hidden) @ w2.T + b2
        cost = float(((sparse - dense) ** 2).sum() / (dense ** 2).sum())
        assert costs.sparsity[j] == pytest.approx(1 - float(keep.mean()), abs=1e-12)
        assert costs.sparsity[j] == pytest.approx([0, 0.05, 0.3, 0.7, 0.9, 0.99][[0, 1, 6, 14, 18, 20].index(j)],
                                                  abs=1 / (x.shape[0] * H // G))
        assert costs.cost[j] == pytest.approx(cost, rel=1e-4)


def test_tied_logits_collapse_the_grid_to_the_points_that_add_sparsity(model):
    cache = build_front_end_cache(model, batches(n_batches=1))
    inputs = dense_block_inputs(model, cache, [0, 1, 2, 3], batch_size=4)
    block = ffn_blocks(model)["decoder.0"]
    fresh = MicroGate(D, H, G).eval()  # zero weights: one logit for every group and token
    costs = block_costs(block, fresh, inputs.inputs["decoder.0"])
    assert costs.sparsity == [0.0, 1.0] and costs.cost[0] == 0.0 and costs.cost[1] == pytest.approx(1.0, rel=1e-6)
    assert costs.tokens == 4 * 10  # the decoder's queries, all real


# ---------------------------------------------------------------- the greedy allocation

def test_greedy_moves_the_cheaper_block_first():
    # Equal sizes. Per step of 0.5 in a block: +0.25 overall; A adds 0.1 per step (rate 0.4), B 1.0 (rate 4).
    a = BlockCosts(offsets=[-1.0, 0.0, 1.0], sparsity=[0.0, 0.5, 1.0], cost=[0.0, 0.1, 0.2], tokens=10, hidden=4)
    b = BlockCosts(offsets=[-2.0, 0.0, 2.0], sparsity=[0.0, 0.5, 1.0], cost=[0.0, 1.0, 2.0], tokens=10, hidden=4)
    assert greedy_allocation({"decoder.0": b, "encoder.0": a}, 0.25) == {"encoder.0": 1, "decoder.0": 0}
    assert greedy_allocation({"decoder.0": b, "encoder.0": a}, 0.5) == {"encoder.0": 2, "decoder.0": 0}
    # A is spent at 0.5 overall; B must move once to pass 0.6 (0.75 overall).
    assert greedy_allocation({"decoder.0": b, "encoder.0": a}, 0.6) == {"encoder.0": 2, "decoder.0": 1}
    # An unreachable target leaves every block at its last point.
    assert greedy_allocation({"decoder.0": b, "encoder.0": a}, 1.5) == {"encoder.0": 2, "decoder.0": 2}
    assert greedy_allocation({"decoder.0": b, "encoder.0": a}, 0.0) == {"encoder.0": 0, "decoder.0": 0}


def test_greedy_weighs_sparsity_by_the_block_share_of_the_slots():
    # A holds 3/4 of the slots: its step of 1.0 buys 0.75 overall for 0.3 (rate 0.4); B's buys 0.25 for 0.2 (0.8).
    a = BlockCosts(offsets=[0.0, 1.0], sparsity=[0.0, 1.0], cost=[0.0, 0.3], tokens=30, hidden=4)
    b = BlockCosts(offsets=[0.0, 1.0], sparsity=[0.0, 1.0], cost=[0.0, 0.2], tokens=5, hidden=8)
    assert greedy_allocation({"encoder.0": a, "decoder.0": b}, 0.5) == {"encoder.0": 1, "decoder.0": 0}
    # Same rate in both: the tie goes to the block first in block order.
    c = BlockCosts(offsets=[0.0, 1.0], sparsity=[0.0, 1.0], cost=[0.0, 0.1], tokens=30, hidden=4)
    d = BlockCosts(offsets=[0.0, 1.0], sparsity=[0.0, 1.0], cost=[0.0, 0.1], tokens=30, hidden=4)
    assert greedy_allocation({"decoder.1": d, "encoder.1": c}, 0.3) == {"encoder.1": 1, "decoder.1": 0}


def test_a_grid_that_does_not_rise_in_sparsity_is_refused():
    with pytest.raises(ValueError, match="rise strictly"):
        BlockCosts(offsets=[0.0, 1.0], sparsity=[0.2, 0.2], cost=[0.0, 0.1], tokens=1, hidden=1)


# ---------------------------------------------------------------- the calibration as a whole

def test_per_block_calibration_meets_the_target_through_the_gated_model(model):
    data = batches(padded=True)
    cache = build_front_end_cache(model, data)
    gates = random_gates(model)
    biases = {name: gate.gate.bias.detach().clone() for name, gate in gates.items()}
    index = list(range(len(cache)))
    result = calibrate(mode="per_block", model=model, gates=gates, cache=cache, index=index, target=0.7,
                       batch_size=4, tolerance=0.002)
    assert result["mode"] == "per_block" and result["images"] == 8
    assert result["sparsity_after"] == pytest.approx(0.7, abs=0.002)
    assert result["allocated_sparsity"] >= 0.7  # the greedy stops once the proxy reaches the target
    assert sorted(result["allocation"]) == sorted(gates)
    for name, gate in gates.items():  # per-block offset and global offset, both folded into the bias
        shift = result["allocation"][name]["offset"] + result["offset"]
        torch.testing.assert_close(gate.gate.bias.detach(), biases[name] - shift, rtol=0, atol=1e-5)
    assert gated_sparsity(model, gates, cache, index, batch_size=2) == pytest.approx(result["sparsity_after"])
    # Recounted by the FFN wrapper from pixels, padding excluded.
    with sparse_ffns(model, gates) as sparsity, torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    assert sparsity.induced_sparsity()["overall"] == pytest.approx(0.7, abs=0.002)
    assert result["seconds"] >= result["allocation_seconds"] > 0


def test_the_costlier_block_gets_the_lower_sparsity(model):
    blocks = ffn_blocks(model)
    gates = random_gates(model, ["encoder.0", "encoder.1"])
    make_cheap_to_close(blocks["encoder.0"], gates["encoder.0"], closable=12)  # 12 of 16 groups: up to 75 %
    cache = build_front_end_cache(model, batches(padded=False))
    index = list(range(len(cache)))
    inputs = dense_block_inputs(model, cache, index, batch_size=4)
    costs = {name: block_costs(blocks[name], gate, inputs.inputs[name]) for name, gate in gates.items()}
    cheap, costly = costs["encoder.0"], costs["encoder.1"]
    assert cheap.tokens == costly.tokens  # equal shares: only the costs decide
    assert cheap.sparsity[:16] == costly.sparsity[:16] == pytest.approx([0.05 * i for i in range(16)], abs=1e-3)
    assert all(c < e / 100 for c, e in zip(cheap.cost[1:16], costly.cost[1:16]))
    result = calibrate_gates_per_block(model, gates, cache, index, target=0.5, batch_size=4, tolerance=0.002)
    allocation = result["allocation"]
    # Known answer: the cheap block steps to 75 % (37.5 % overall) before the costly one moves at all.
    assert allocation["encoder.0"]["sparsity"] >= 0.75 > 0.25 >= allocation["encoder.1"]["sparsity"]
    assert allocation["encoder.0"]["cost"] < allocation["encoder.1"]["cost"]
    assert result["sparsity_after"] == pytest.approx(0.5, abs=0.002)
    data = batches(padded=False)  # the cached images, from pixels: still so once levelled through the gated model
    with sparse_ffns(model, gates) as sparsity, torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    per_block = sparsity.induced_sparsity()["per_block"]
    assert per_block["encoder.0"] > per_block["encoder.1"]
    # The decoder runs dense here; the two gated blocks have equal tokens, so their mean is the gated sparsity.
    assert (per_block["encoder.0"] + per_block["encoder.1"]) / 2 == pytest.approx(0.5, abs=0.002)

def test_global_mode_is_the_bisection_alone_and_unknown_modes_are_refused(model):
    cache = build_front_end_cache(model, batches(n_batches=1))
    gates = random_gates(model)
    result = calibrate("global", model, gates, cache, [0, 1, 2, 3], 0.6, batch_size=4, tolerance=0.005)
    assert result["mode"] == "global" and "allocation" not in result
    assert result["sparsity_after"] == pytest.approx(0.6, abs=0.005)
    with pytest.raises(ValueError, match="mgs.calibration = 'per_layer' is not allowed: one of global, per_block"):
        calibrate("per_layer", model, gates, cache, [0, 1, 2, 3], 0.6, batch_size=4)
