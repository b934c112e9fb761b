"""Layer-local `group_activity` training of MGS gates: the labels against a brute-force recount, a case a linear
gate can learn exactly, the first step's loss as a known answer, settings checks and reproducibility."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.mgs.group_activity import LocalTraining, group_labels, train_group_activity


# ---------------------------------------------------------------- the labels

def test_group_labels_match_a_brute_force_recount_including_a_dead_group():
    torch.manual_seed(0)
    d, hidden, group_size = 5, 12, 4
    fc1 = nn.Linear(d, hidden)
    with torch.no_grad():
        fc1.bias[4:8] = -100.0  # group 1 can never fire: |w x| stays far below 100 for these inputs
    x = torch.randn(7, d)
    weight, bias, rows = fc1.weight.tolist(), fc1.bias.tolist(), x.tolist()
    pre = [[sum(w * v for w, v in zip(weight[n], row)) + bias[n] for n in range(hidden)] for row in rows]
    assert min(abs(z) for token in pre for z in token) > 1e-4  # no sign near float rounding
    expected = [[any(max(0.0, token[n]) > 0 for n in range(g * group_size, (g + 1) * group_size))
                 for g in range(hidden // group_size)] for token in pre]

    labels = group_labels(fc1, x, group_size)

    assert labels.dtype == torch.bool and labels.shape == (7, 3)
    assert labels.tolist() == expected
    assert not labels[:, 1].any()
    assert any(any(token) for token in expected)


def test_group_labels_refuse_a_group_size_that_does_not_divide_the_width():
    with pytest.raises(ValueError, match="group_size = 5 is not allowed: must divide the FFN width 12"):
        group_labels(nn.Linear(3, 12), torch.zeros(2, 3), 5)


# ---------------------------------------------------------------- a case a linear gate can learn

D = 8
# Group g of a block is active exactly when input coordinate `coordinate[g]` exceeds `threshold[g]`.
BLOCKS = {"encoder.0": {"group_size": 16, "coordinates": [0, 1, 2, 3], "thresholds": [-1.0, 0.0, 0.5, 1.0],
                        "tokens_per_image": 24},
          "decoder.0": {"group_size": 8, "coordinates": [3, 5, 6, 7], "thresholds": [-0.5, 0.25, -1.5, 0.75],
                        "tokens_per_image": 6}}
IMAGE_IDS = 1000 + 3 * torch.arange(100)  # not 0..N-1, and not contiguous


def threshold_fc1(coordinates: list[int], thresholds: list[float], group_size: int) -> nn.Linear:
    """fc1 whose neuron n of group g computes a_n (x[c_g] - t_g), a_n a power of two: every product and the
    bias are exact in float32, so the sign, and with it the label, is exactly that of x[c_g] - t_g."""
    fc1 = nn.Linear(D, len(thresholds) * group_size)
    scales = [0.5, 1.0, 2.0, 4.0]
    with torch.no_grad():
        fc1.weight.zero_()
        for g, (c, t) in enumerate(zip(coordinates, thresholds)):
            for k in range(group_size):
                n, a = g * group_size + k, scales[k % len(scales)]
                fc1.weight[n, c], fc1.bias[n] = a, -a * t
    return fc1


def make_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    fc1, inputs, images, gates = {}, {}, {}, {}
    for name, spec in BLOCKS.items():
        fc1[name] = threshold_fc1(spec["coordinates"], spec["thresholds"], spec["group_size"])
        images[name] = IMAGE_IDS.repeat_interleave(spec["tokens_per_image"])
        inputs[name] = torch.randn(len(images[name]), D, generator=generator)
        gates[name] = MicroGate(D, fc1[name].out_features, spec["group_size"])
    return gates, fc1, inputs, images


def expected_labels(name: str, x: torch.Tensor) -> torch.Tensor:
    spec = BLOCKS[name]
    return x[:, spec["coordinates"]] > torch.tensor(spec["thresholds"])


LEARN = LocalTraining(steps=300, batch_tokens=256, learning_rate=0.05, pos_weight=1.0, held_out=0.2)


def test_training_learns_a_linearly_predictable_activity_and_reports_recountable_numbers():
    gates, fc1, inputs, images = make_case()
    before = {name: (layer.weight.clone(), layer.bias.clone()) for name, layer in fc1.items()}
    logged = []

    record = train_group_activity(gates, fc1, inputs, images, LEARN, seed=0,
                                  log_step=lambda step, metrics: logged.append((step, metrics)))

    for name, layer in fc1.items():
        assert torch.equal(layer.weight, before[name][0]) and torch.equal(layer.bias, before[name][1])
    held = torch.tensor(record["held_out_images"])
    assert len(held) == 20 and set(held.tolist()) <= set(IMAGE_IDS.tolist())
    pooled = torch.zeros(3)
    for name, spec in BLOCKS.items():
        block, gate, x = record["blocks"][name], gates[name], inputs[name]
        positives = expected_labels(name, x)
        assert block["positive_rate"] == pytest.approx(int(positives.sum()) / positives.numel(), abs=1e-12)
        per_image = spec["tokens_per_image"]
        assert (block["train_tokens"], block["held_out_tokens"]) == (80 * per_image, 20 * per_image)
        # Recount on the held-out tokens, from the returned gate's weights and the construction's labels.
        is_held = torch.isin(images[name], held)
        with torch.no_grad():
            p = torch.sigmoid(x[is_held] @ gate.gate.weight.T + gate.gate.bias)
        opened, labels = p > gate.threshold, expected_labels(name, x[is_held])
        hits = int((opened & labels).sum())
        assert block["precision"] == pytest.approx(hits / int(opened.sum()), abs=1e-12)
        assert block["recall"] == pytest.approx(hits / int(labels.sum()), abs=1e-12)
        assert block["precision"] > 0.95 and block["recall"] > 0.95
        pooled += torch.tensor([hits, int(opened.sum()), int(labels.sum())])
    assert record["precision"] == pytest.approx(float(pooled[0] / pooled[1]))
    assert record["recall"] == pytest.approx(float(pooled[0] / pooled[2]))
    assert all(not gate.training for gate in gates.values())

    assert [step for step, _ in logged] == list(range(1, 301))
    evaluated = [step for step, metrics in logged if "precision.encoder.0" in metrics]
    assert evaluated == list(range(30, 301, 30))
    assert record["loss"] == logged[-1][1]["loss"] < logged[0][1]["loss"]
    assert record["curve"][-1]["step"] == 300 and len(record["curve"]) <= 201
    assert record["train_seconds"] > 0


def test_the_first_step_loss_is_the_weighted_bce_of_the_initial_gates():
    """Fresh gates output logit 2 everywhere; a block whose groups always fire and one whose groups never do
    give the first loss as a known answer: the mean of pos_weight * softplus(-2) and softplus(2)."""
    fc1 = {"encoder.0": nn.Linear(D, 32), "decoder.0": nn.Linear(D, 32)}
    with torch.no_grad():
        for layer, bias in zip(fc1.values(), (100.0, -100.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)
    inputs = {name: torch.randn(40, D, generator=torch.Generator().manual_seed(3)) for name in fc1}
    images = {name: torch.arange(10).repeat_interleave(4) for name in fc1}
    gates = {name: MicroGate(D, 32, 16) for name in fc1}
    logged = []
    settings = LocalTraining(steps=1, batch_tokens=16, learning_rate=0.01, pos_weight=3.0, held_out=0.3)

    record = train_group_activity(gates, fc1, inputs, images, settings, seed=0,
                                  log_step=lambda step, metrics: logged.append(metrics))

    always, never = 3.0 * math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))
    assert logged[0]["loss.encoder.0"] == pytest.approx(always, rel=1e-6)
    assert logged[0]["loss.decoder.0"] == pytest.approx(never, rel=1e-6)
    assert record["loss"] == pytest.approx((always + never) / 2, rel=1e-6)
    assert record["blocks"]["encoder.0"]["positive_rate"] == 1.0
    assert record["blocks"]["decoder.0"]["positive_rate"] == 0.0
    assert record["positive_rate"] == 0.5
    assert len(record["held_out_images"]) == 3
    # After one small step every group is still open: all of "never"'s opens are wrong, it misses nothing.
    assert (record["blocks"]["decoder.0"]["precision"], record["blocks"]["decoder.0"]["recall"]) == (0.0, 1.0)
    assert (record["blocks"]["encoder.0"]["precision"], record["blocks"]["encoder.0"]["recall"]) == (1.0, 1.0)


# ---------------------------------------------------------------- settings and reproducibility

@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 2.5), ("batch_tokens", -1), ("batch_tokens", True), ("learning_rate", 0.0),
    ("learning_rate", float("nan")), ("pos_weight", -1.0), ("pos_weight", float("inf")), ("held_out", 0.0),
    ("held_out", 1.0), ("held_out", "0.1")])
def test_bad_settings_are_refused_naming_the_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field} = {value!r} is not allowed")):
        LocalTraining(**{field: value})


def test_inputs_that_do_not_fit_the_block_are_refused_naming_it():
    gates, fc1, inputs, images = make_case()
    narrow = {**inputs, "decoder.0": inputs["decoder.0"][:, :4]}
    with pytest.raises(ValueError, match=r"inputs of block decoder\.0 are \(600, 4\)"):
        train_group_activity(gates, fc1, narrow, images, LEARN, seed=0)
    with pytest.raises(ValueError, match=r"block encoder\.0 has a gate but no fc1"):
        train_group_activity(gates, {"decoder.0": fc1["decoder.0"]}, inputs, images, LEARN, seed=0)


def test_the_same_seed_gives_identical_gates_and_another_seed_does_not():
    settings = LocalTraining(steps=20, batch_tokens=64, learning_rate=0.05, pos_weight=0.5, held_out=0.2)
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        gates, fc1, inputs, images = make_case()
        record = train_group_activity(gates, fc1, inputs, images, settings, seed=seed)
        runs[key] = ({name: gate.state_dict() for name, gate in gates.items()}, record)
    for name in BLOCKS:
        for key in ("gate.weight", "gate.bias"):
            assert torch.equal(runs["a"][0][name][key], runs["b"][0][name][key])
        assert not torch.equal(runs["a"][0][name]["gate.weight"], runs["c"][0][name]["gate.weight"])
    drop_time = lambda record: {k: v for k, v in record.items() if k != "train_seconds"}
    assert drop_time(runs["a"][1]) == drop_time(runs["b"][1])
    assert runs["a"][1]["held_out_images"] != runs["c"][1]["held_out_images"]
