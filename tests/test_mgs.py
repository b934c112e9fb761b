"""MGS on a small random DETR: gates, the cached front end, gate training and the gated model to take away."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DetrImageProcessorPil

from detr_sparsity.execution.gated_detr import add_gates, load_gated_detr
from detr_sparsity.mgs.calibration import calibrate_gate_alone, calibrate_gates, gated_sparsity
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.mgs.gates import MicroGate, gate_metadata, load_gate_set, load_gates, make_gates, save_gates
from detr_sparsity.mgs.objectives import OBJECTIVES, objective_loss, oracle_groups
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.models.front_end import cached_front_end
from detr_sparsity.models.load import weights_digest
from detr_sparsity.sparsity.ffn import SparseFFN, ffn_blocks, sparse_ffns

from tiny_detr import D, G, H, batches, tiny_detr


@pytest.fixture()
def model():
    return tiny_detr()


def trained_gates(model, cache, target=0.75, objective="task", steps=12, **kwargs):
    gates = make_gates(ffn_blocks(model), list(ffn_blocks(model)), G, 0.5)
    settings = GateTraining(target=target, objective=objective, steps=steps, batch_size=4, learning_rate=0.05,
                            multiplier_rate=0.5, target_warmup=0.25, checkpoint_every=4)
    trained_gates.last = train_gates(model, gates, cache, settings, seed=0, **kwargs)
    return gates


# ---------------------------------------------------------------- the cached front end

def test_cached_front_end_reproduces_the_full_forward_of_a_padded_batch(model, tmp_path):
    data = batches()
    cache = build_front_end_cache(model, data)
    cache.save(tmp_path / "cache.safetensors")
    cache = FrontEndCache.load(tmp_path / "cache.safetensors")
    assert len(cache) == 8 and cache.shapes[3].tolist() == [6, 4] and cache.shapes[0].tolist() == [6, 8]
    batch = cache.batch([0, 1, 2, 3])
    with torch.no_grad():
        full = model(pixel_values=data[0]["pixel_values"], pixel_mask=data[0]["pixel_mask"])
        with cached_front_end(model) as front:
            cached = model(**front.inputs(batch["features"], batch["mask"]))
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.pred_boxes, full.pred_boxes, rtol=0, atol=1e-5)
    assert torch.equal(batch["teacher_logits"], full.logits)  # the dense outputs of the same forward
    assert torch.equal(batch["labels"][1]["boxes"], data[0]["labels"][1]["boxes"])
    assert not isinstance(model.model.input_projection, torch.nn.Identity)  # restored on exit


def test_a_batch_of_narrow_images_only_is_padded_to_its_own_size(model):
    cache = build_front_end_cache(model, batches())
    narrow = cache.batch([3, 7])
    assert narrow["features"].shape[-2:] == (6, 4) and narrow["mask"].all()


# ---------------------------------------------------------------- the gate

def test_gate_mask_opens_whole_groups_and_passes_gradients_straight_through():
    gate = MicroGate(D, H, G)
    torch.nn.init.normal_(gate.gate.weight)
    x = torch.randn(2, 5, D)
    gate.eval()
    keep = gate.mask(x, None)
    assert keep.dtype == torch.bool and keep.shape == (2, 5, H)
    grouped = keep.view(2, 5, H // G, G)
    assert torch.equal(grouped.all(-1), grouped.any(-1))  # a group is open or closed as a whole
    assert torch.equal(keep[..., ::G], torch.sigmoid(gate(x)) > 0.5)
    gate.train()
    soft = gate.mask(x, None)
    assert torch.equal(soft.detach(), keep.float())  # the forward pass applies exactly the hard mask
    soft.sum().backward()
    assert gate.gate.weight.grad.abs().sum() > 0  # and the backward pass the gradient of p
    assert gate.overhead_macs_per_token(D, H) == D * H // G


@pytest.mark.parametrize("bad, message", [
    ({"group_size": 48}, "group_size = 48 is not allowed: must divide the FFN width 256"),
    ({"threshold": 1.0}, r"gate_threshold = 1.0 is not allowed: must be in \(0, 1\)"),
])
def test_bad_gate_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MicroGate(D, H, **{"group_size": G, **bad})


def test_gates_for_unknown_blocks_are_refused(model):
    with pytest.raises(ValueError, match=r"mgs.blocks names encoder.7, not FFN blocks.*encoder.0, encoder.1"):
        make_gates(ffn_blocks(model), ["encoder.0", "encoder.7"], G, 0.5)


def test_a_gate_set_for_other_blocks_is_refused_naming_the_stage_to_rerun(model, tmp_path):
    path = tmp_path / "gates.safetensors"
    save_gates(path, make_gates(ffn_blocks(model), ["encoder.0"], G, 0.5), {})
    assert list(load_gate_set(path, ["encoder.0"], "mgs_local")) == ["encoder.0"]
    with pytest.raises(ValueError, match=re.escape(f"{path} gates blocks encoder.0, mgs.blocks asks for decoder.0, "
                                                   "encoder.0; rerun stage mgs_local")):
        load_gate_set(path, ["encoder.0", "decoder.0"], "mgs_local")


@pytest.mark.parametrize("bad, message", [
    ({"target": 1.0}, "target = 1.0 is not allowed"),
    ({"objective": "l1"}, "objective = 'l1' is not allowed: allowed values: task, distillation, oracle"),
    ({"target_warmup": 1.5}, "target_warmup = 1.5 is not allowed"),
])
def test_bad_training_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GateTraining(**{"target": 0.5, **bad})


def test_a_training_from_the_params_budget_leaves_the_start_to_the_caller():
    budget = {"steps": 1000, "batch_size": 16, "learning_rate": 0.01, "multiplier_rate": 0.05, "target_warmup": 0.3,
              "checkpoint_every": 250, "warm_start": True}
    assert GateTraining.from_budget(budget, 0.95, "distillation", steps=10) == GateTraining(
        target=0.95, objective="distillation", steps=10, batch_size=16, learning_rate=0.01, multiplier_rate=0.05,
        target_warmup=0.3, checkpoint_every=250)


def test_oracle_groups_are_the_largest_summed_activations():
    activations = torch.tensor([[0.0, 1.0, 5.0, 0.0, 2.0, 2.0, 0.0, 0.5]])  # groups of 2: sums 1, 5, 4, 0.5
    assert oracle_groups(activations, 2, 2).tolist() == [[0.0, 1.0, 1.0, 0.0]]


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_reaches_the_gates(model, objective):
    cache = build_front_end_cache(model, batches(padded=False))
    batch = cache.batch([0, 1, 2, 3])
    gates = make_gates(ffn_blocks(model), list(ffn_blocks(model)), G, 0.5)
    for gate in gates.values():  # gates that already close some groups, so distillation has a signal
        torch.nn.init.normal_(gate.gate.weight, std=0.5)
    with cached_front_end(model) as front, sparse_ffns(model, gates) as sparsity:
        for gate in gates.values():
            gate.train()
            gate.keep_activations = True
        outputs = model(**front.inputs(batch["features"], batch["mask"]), labels=batch["labels"])
        loss = objective_loss(objective, outputs, batch, gates, sparsity, target=0.75, box_weight=5.0)
        loss.backward()
    assert torch.isfinite(loss)
    assert all(gate.gate.weight.grad.abs().sum() > 0 for gate in gates.values())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_changes_only_the_gates_and_reaches_the_target(model, objective):
    data = batches(padded=False)
    cache = build_front_end_cache(model, data)
    before = weights_digest(model)
    gates = trained_gates(model, cache, target=0.75, objective=objective, steps=80)
    assert weights_digest(model) == before  # the dense DETR is frozen
    assert all(not p.requires_grad for p in model.parameters())
    with sparse_ffns(model, gates) as sparsity, torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    assert sparsity.induced_sparsity()["overall"] == pytest.approx(0.75, abs=0.1)


def test_interrupted_training_resumes_to_the_same_gates(model, tmp_path):
    cache = build_front_end_cache(model, batches(padded=False))
    straight = trained_gates(model, cache)
    straight_curve = trained_gates.last["curve"]

    class Interrupted(Exception):
        pass

    def interrupt_at_step_7(step, _metrics):
        if step == 7:
            raise Interrupted

    checkpoint = tmp_path / "gates.ckpt"
    with pytest.raises(Interrupted):
        trained_gates(model, cache, checkpoint=checkpoint, log_step=interrupt_at_step_7)
    assert torch.load(checkpoint, weights_only=False)["step"] == 4  # the last checkpoint before the interruption
    # The interruption left the model as it was: no FFN wrapper, the real backbone and input projection.
    assert not any(isinstance(block, SparseFFN) for block in ffn_blocks(model).values())
    assert not isinstance(model.model.input_projection, torch.nn.Identity)
    resumed = trained_gates(model, cache, checkpoint=checkpoint)
    for name in straight:
        assert torch.equal(straight[name].gate.weight, resumed[name].gate.weight), name
    # The curve kept in training.json spans every step, the ones before the interruption included.
    assert [point["step"] for point in straight_curve] == list(range(1, 13))
    assert trained_gates.last["curve"] == straight_curve


def test_calibration_sets_the_held_out_sparsity_to_the_target(model):
    data = batches(padded=True)
    cache = build_front_end_cache(model, data)
    gates = trained_gates(model, cache, target=0.5)
    held_out = [4, 5, 6, 7]
    result = calibrate_gates(model, gates, cache, held_out, target=0.8, batch_size=4, tolerance=0.005)
    assert result["sparsity_after"] == pytest.approx(0.8, abs=0.005) and result["offset"] > 0
    assert gated_sparsity(model, gates, cache, held_out, batch_size=2) == pytest.approx(result["sparsity_after"])
    with sparse_ffns(model, gates) as sparsity, torch.no_grad():  # the same images, from pixels
        model(pixel_values=data[1]["pixel_values"], pixel_mask=data[1]["pixel_mask"])
    assert sparsity.induced_sparsity()["overall"] == pytest.approx(result["sparsity_after"], abs=1e-6)
    assert all(gate.threshold == 0.5 for gate in gates.values())


@pytest.mark.parametrize("block", ["encoder.0", "decoder.1"])
def test_a_gate_alone_is_calibrated_on_its_recorded_inputs_as_through_the_model(model, block):
    """Known answer: `calibrate_gates` with that one gate, which runs the gated model at every bisection step; on
    padded batches, so the encoder block's padding positions must be left out as the wrapper leaves them out."""
    data = batches(padded=True)
    cache = build_front_end_cache(model, data)
    trained = trained_gates(model, cache, target=0.5)
    held_out = list(range(8))
    through_model, alone = ({block: MicroGate(D, H, G)} for _ in range(2))
    for gates in (through_model, alone):
        gates[block].load_state_dict(trained[block].state_dict())
    want = calibrate_gates(model, through_model, cache, held_out, target=0.7, batch_size=4)
    got = calibrate_gate_alone(model, block, alone[block], cache, held_out, target=0.7, batch_size=4)
    assert want["offset"] != 0 and got["offset"] == want["offset"]
    assert got["sparsity_before"] == want["sparsity_before"] and got["sparsity_after"] == want["sparsity_after"]
    assert torch.equal(alone[block].gate.bias, through_model[block].gate.bias)  # the offset folded in alike


# ---------------------------------------------------------------- the gated model to take away

def test_saved_gates_reload_and_the_gated_model_gives_the_evaluated_detections(model, tmp_path):
    data = batches()
    cache = build_front_end_cache(model, data)
    gates = trained_gates(model, cache, target=0.5)
    path = tmp_path / "gates.safetensors"
    save_gates(path, gates, {"target": 0.5})
    assert gate_metadata(path)["info"] == {"target": 0.5} and gate_metadata(path)["group_size"] == G
    model.save_pretrained(tmp_path / "model")

    with sparse_ffns(model, gates) as sparsity, torch.no_grad():  # what the evaluation ran
        evaluated = model(pixel_values=data[0]["pixel_values"], pixel_mask=data[0]["pixel_mask"])
    assert sparsity.induced_sparsity()["overall"] > 0.2

    gated = load_gated_detr(tmp_path / "model", path)
    reloaded = load_gated_detr(tmp_path / "model", path)
    processor = DetrImageProcessorPil()
    sizes = [(96, 128)] * 4
    with torch.no_grad():
        outputs = [m(pixel_values=data[0]["pixel_values"], pixel_mask=data[0]["pixel_mask"]) for m in (gated, reloaded)]
    assert torch.equal(outputs[0].logits, evaluated.logits) and torch.equal(outputs[0].pred_boxes, evaluated.pred_boxes)
    detections = [processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes) for out in outputs]
    assert len(detections[0]) == 4 and detections[0][0]["boxes"].shape == (10, 4)
    for a, b in zip(*detections):
        assert all(torch.equal(a[k], b[k]) for k in ("scores", "labels", "boxes"))


def test_gates_for_another_model_are_refused(model, tmp_path):
    gate = MicroGate(D, H, G)
    path = tmp_path / "gates.safetensors"
    save_gates(path, {"encoder.5": gate}, {})
    with pytest.raises(ValueError, match="names encoder.5, not FFN blocks of this model"):
        add_gates(model, load_gates(path))
    save_gates(path, {"encoder.0": MicroGate(2 * D, H, G)}, {})
    with pytest.raises(ValueError, match="does not fit an FFN block with d = 32"):
        add_gates(model, load_gates(path))
    with pytest.raises(ValueError, match="is not an MGS gate file"):
        load_gates(_plain_safetensors(tmp_path))


def _plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    return tmp_path / "plain.safetensors"
