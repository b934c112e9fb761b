"""The `threshold` policy (a dynamic oracle, as CATS and TEAL): its calibration against an independent recount
with numpy's quantile, its mask, its FLOPs convention (fc2 only, like top-k), and the masking stage running it,
whole and sharded, on a tiny synthetic study."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.evaluation.flops import FlopCount, flops_per_image
from detr_sparsity.evaluation.shards import Sharding
from detr_sparsity.models.load import load_detr
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns
from detr_sparsity.sparsity.policies import Threshold, TopK, keep_count, masking_policy
from detr_sparsity.sparsity.thresholds import (DROPPED_BITS, ActivationHistogram, OutputError, allocate_thresholds,
                                               bin_top, calibrate_thresholds)
from detr_sparsity.stages import masking as masking_stage
from tiny_project import TINY, Untracked, tiny_params, untracked_study

D, H, QUERIES = 16, 64, 6
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2,
        "num_queries": QUERIES, "backbone_hidden_sizes": [8, 16], "backbone_depths": [1, 1], "dropout": 0.0}
BLOCKS = ["encoder.0", "decoder.0"]
# 0.0 and 0.2 lie below a random block's natural sparsity (about one half): the threshold is then 0.
TARGETS = [0.0, 0.2, 0.6, 0.9, 0.99]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_small_detr(small_detr_config(ARCH, [{"id": 1, "name": "disc"}])).eval()


def make_batch(padded: bool, images: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(images, 3, 64, 96, generator=generator)
    pixel_mask = torch.ones(images, 64, 96, dtype=torch.long)
    if padded:  # the last image is narrower: its right part is padding
        pixel_mask[-1, :, 48:] = 0
        pixel_values[-1, :, :, 48:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


@torch.no_grad()
def real_encoder_tokens(model, batch) -> torch.Tensor:
    """The encoder's real positions, straight from the backbone (independent of the wrapper)."""
    _features, mask = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])[-1]
    return mask.flatten(1).bool()


@torch.no_grad()
def real_activations(model, batch) -> dict[str, torch.Tensor]:
    """Per block, (real tokens, H) post-ReLU activations of the plain model: fc1 hooks, padding removed with the
    backbone's own mask (independent of the wrapper)."""
    real = real_encoder_tokens(model, batch)
    captured, handles = {}, []
    for name, block in ffn_blocks(model).items():
        handles.append(block.fc1.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, torch.relu(out))))
    model(**batch)
    for handle in handles:
        handle.remove()
    return {name: (acts[real] if name.startswith("encoder") else acts.reshape(-1, H))
            for name, acts in captured.items()}


@torch.no_grad()
def masked_run(model, batch, policies, flops: FlopCount | None = None):
    """Run with `policies` installed; returns the wrappers' measures and, per block, the post-ReLU activations and
    fc2's input over real tokens as that very run computed them (a masked block changes every later block's input)."""
    real = real_encoder_tokens(model, batch)
    seen: dict[str, dict[str, torch.Tensor]] = {"fc1": {}, "fc2": {}}

    def rows(name, tensor):
        return tensor[real] if name.startswith("encoder") else tensor.reshape(-1, H)

    with sparse_ffns(model, policies) as sparsity:
        hooks = []
        for name, wrapper in sparsity.blocks.items():
            hooks.append(wrapper.block.fc1.register_forward_hook(
                lambda _m, _i, out, name=name: seen["fc1"].__setitem__(name, rows(name, torch.relu(out)))))
            hooks.append(wrapper.block.fc2.register_forward_pre_hook(
                lambda _m, args, name=name: seen["fc2"].__setitem__(name, rows(name, args[0]))))
        if flops is None:
            model(**batch)
        else:
            with flops:
                model(**batch)
        for hook in hooks:
            hook.remove()
    return sparsity, seen["fc1"], seen["fc2"]


def check_against_numpy(values: np.ndarray, found: dict) -> None:
    """One block's calibration against numpy's inverted_cdf quantile over its collected real-token activations."""
    n, zeros = values.size, int((values == 0).sum())
    for target, block in found.items():
        assert block.natural_sparsity == zeros / n
        q = float(np.quantile(values, target, method="inverted_cdf"))
        at_most = int((values <= block.threshold).sum())
        assert block.calibration_sparsity == at_most / n  # exact, not an estimate
        assert block.calibration_sparsity >= target
        if target * n <= zeros:  # at or below the natural sparsity: t = 0, it skips exactly the zeros
            assert q == 0.0 and block.threshold == 0.0
            assert block.calibration_sparsity == block.natural_sparsity
            continue
        # the top of the quantile's bin: at or above the exact quantile, within 2^-12 of it ...
        assert q <= block.threshold <= q * (1 + 2.0 ** -12)
        assert np.float32(block.threshold) == block.threshold
        # ... and the smallest bin top that reaches the target: the previous bin's top does not
        previous = bin_top((int(np.float32(block.threshold).view(np.int32)) >> DROPPED_BITS) - 1)
        assert previous < q and (values <= previous).sum() < math.ceil(target * n)


def test_calibration_is_numpys_quantile_over_real_tokens_within_one_bin(model):
    batches = [make_batch(padded=True, seed=1), make_batch(padded=False, seed=2, images=1)]
    found = calibrate_thresholds(model, batches, TARGETS)
    assert list(found) == BLOCKS
    collected = {name: [] for name in BLOCKS}
    for batch in batches:
        for name, acts in real_activations(model, batch).items():
            collected[name].append(acts.numpy())
    for name in BLOCKS:
        values = np.concatenate(collected[name]).ravel()
        assert 0.3 < (values == 0).mean() < 0.7, "a random block: about half its activations are zero"
        check_against_numpy(values, found[name])
    # the batches' order does not matter: the histogram is exact
    assert calibrate_thresholds(model, batches[::-1], TARGETS) == found


def test_padded_tokens_are_excluded(model):
    batch = make_batch(padded=True)
    histogram = ActivationHistogram()
    with sparse_ffns(model) as sparsity:
        sparsity.add_observer(histogram)
        with torch.no_grad():
            model(**batch)
    real = real_activations(model, batch)
    padded_too = sparsity.blocks["encoder.0"].counts.all_tokens * H
    assert int(histogram.values["encoder.0"]) == real["encoder.0"].numel() < padded_too
    assert int(histogram.values["decoder.0"]) == 2 * QUERIES * H
    for name in BLOCKS:
        assert int(histogram.zeros[name]) == int(sparsity.blocks[name].counts.natural_zeros)


def test_histogram_on_known_values():
    """A hand-made block: ties, zeros, padding that would change the answer, and targets at or below the zeros."""
    # one image, 5 tokens of H = 4; the last token is padding, full of large values
    acts = torch.tensor([[[0.0, 0.0, 0.5, 1.0],
                          [0.0, 0.5, 0.5, 3.0],
                          [0.0, 0.25, 4.0, 0.0],
                          [0.0, 2.0, 0.0, 0.0],
                          [9.0, 9.0, 9.0, 9.0]]])
    real = torch.tensor([[True, True, True, True, False]])
    histogram = ActivationHistogram()
    histogram("encoder.0", acts, real, torch.count_nonzero(acts, dim=-1))
    found = histogram.thresholds("encoder.0", [0.0, 0.25, 0.5, 0.6, 0.9, 0.95])
    values = acts[real].numpy().ravel()  # 16 values: 8 zeros, 0.25, 0.5 x 3, 1, 2, 3, 4
    check_against_numpy(values, found)
    for target in (0.0, 0.25, 0.5):  # at or below the natural sparsity 8 / 16: t = 0, which skips the zeros
        assert found[target].threshold == 0.0 and found[target].calibration_sparsity == 0.5
    # 0.6 x 16 = 9.6: the 10th smallest is 0.5, a tie of three: every 0.5 is skipped, 12 of 16
    assert found[0.6].threshold == pytest.approx(0.5, rel=2 ** -12) and found[0.6].calibration_sparsity == 12 / 16
    # 0.9: the 15th smallest, 3; the padding's 9s would have made it 9
    assert found[0.9].threshold == pytest.approx(3.0, rel=2 ** -12) and found[0.9].calibration_sparsity == 15 / 16
    assert found[0.95].threshold == pytest.approx(4.0, rel=2 ** -12) and found[0.95].calibration_sparsity == 1.0
    with pytest.raises(ValueError, match=r"target of 1.0 is not allowed: must be in \[0, 1\)"):
        histogram.thresholds("encoder.0", [1.0])
    broken = ActivationHistogram()
    broken("decoder.0", torch.tensor([[[float("nan"), 1.0]]]), None, torch.tensor([[2]]))
    with pytest.raises(ValueError, match="decoder.0: 1 of 2 activations are not a number"):
        broken.thresholds("decoder.0", [0.5])


def test_output_error_on_known_values():
    """A hand-made block (H = 3, d = 2): the error of skipping the activations at or below each threshold, over
    real tokens, relative to the output energy (fc2's bias included in the energy, cancelled in the error)."""
    fc1, fc2 = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
    with torch.no_grad():
        fc2.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
        fc2.bias.copy_(torch.tensor([1.0, 0.0]))
    block = torch.nn.Module()
    block.fc1, block.fc2 = fc1, fc2
    acts = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 3.0, 1.0], [7.0, 7.0, 7.0]]])  # the last token is padding
    real = torch.tensor([[True, True, False]])
    error = OutputError({"encoder.0": block}, {"encoder.0": [0.0, 0.5, 2.0]})
    error("encoder.0", acts, real, torch.count_nonzero(acts, dim=-1))
    # outputs W a + b: token 1 (1 + 1 + 1, 2 + 0.5) = (3, 2.5); token 2 (0 + 2 + 1, 3 + 1) = (3, 4)
    energy = 9 + 6.25 + 9 + 16
    # t = 0: nothing positive dropped. t = 0.5: token 1 drops 0.5 -> W (0, 0, 0.5) = (1, 0.5).
    # t = 2: token 1 drops all -> (2, 2.5); token 2 drops 1 -> (2, 1).
    expected = [0.0, (1 + 0.25) / energy, (4 + 6.25 + 4 + 1) / energy]
    assert error.costs("encoder.0") == pytest.approx(expected, rel=1e-12)


def test_greedy_allocation_lands_on_the_target_and_spares_the_costly_block(model):
    """Decoder's FFN output scaled up 100x costs 10^4 times more per skipped activation: the allocation puts the
    sparsity in the encoder block first; the overall calibration sparsity, recounted from the activations, is the
    target within one histogram bin."""
    batches = [make_batch(padded=True, seed=1), make_batch(padded=False, seed=2, images=1)]
    costly = build_small_detr(small_detr_config(ARCH, [{"id": 1, "name": "disc"}])).eval()
    costly.load_state_dict(model.state_dict())
    with torch.no_grad():
        ffn_blocks(costly)["decoder.0"].fc2.weight.mul_(100.0)
    collected = {name: [] for name in BLOCKS}
    for batch in batches:
        for name, acts in real_activations(costly, batch).items():
            collected[name].append(acts.numpy().ravel())
    values = {name: np.concatenate(v) for name, v in collected.items()}
    slots = sum(v.size for v in values.values())
    for target in (0.6, 0.75):
        uniform, allocated, record = allocate_thresholds(costly, batches, target)
        recount = {name: float((values[name] <= allocated[name].threshold).mean()) for name in BLOCKS}
        overall = sum(recount[n] * values[n].size for n in BLOCKS) / slots
        assert record["allocated_sparsity"] == pytest.approx(overall, abs=1e-12)
        assert target <= overall <= target + 2 / slots + 2.0 ** -12  # a bin's worth at most
        assert recount["encoder.0"] > target > recount["decoder.0"]
        # the uniform thresholds are the plain calibration's
        assert uniform == {n: per[target] for n, per in calibrate_thresholds(costly, batches, [target]).items()}


def test_the_policy_keeps_exactly_the_activations_above_its_threshold(model):
    activations = torch.relu(torch.randn(3, 7, H, generator=torch.Generator().manual_seed(0)))
    t = float(activations.flatten().median())
    keep = Threshold(t).mask(None, activations)
    assert keep.dtype == torch.bool and torch.equal(keep, activations > t)
    assert len(set(keep.sum(-1).flatten().tolist())) > 1, "the number kept varies per token"
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"threshold = {bad} is not allowed"):
            Threshold(bad)
    with pytest.raises(ValueError, match="threshold policy of block encoder.0 needs its calibrated threshold"):
        masking_policy("threshold", 0.5, 0, "encoder.0")
    policy = masking_policy("threshold", 0.5, 0, "encoder.0", {"encoder.0": t})
    assert isinstance(policy, Threshold) and policy.threshold == t and policy.reads_activations

    # Through the wrapper: fc2 receives relu(fc1 x) * 1[relu(fc1 x) > t]; a threshold of 0 is bit-identical to dense.
    batch = make_batch(padded=True)
    sparsity, activations, fc2_inputs = masked_run(model, batch, {name: Threshold(t) for name in BLOCKS})
    for name in BLOCKS:
        kept = int((activations[name] > t).sum())
        assert 0 < kept < activations[name].numel()
        assert int(sparsity.blocks[name].counts.kept) == kept
        assert sparsity.induced_sparsity()["per_block"][name] == 1 - kept / activations[name].numel()
        assert torch.equal(fc2_inputs[name], activations[name] * (activations[name] > t))
    with torch.no_grad():
        plain = model(**batch)
        with sparse_ffns(model, {name: Threshold(0.0) for name in BLOCKS}) as sparsity:
            at_zero = model(**batch)
    assert torch.equal(plain.logits, at_zero.logits) and torch.equal(plain.pred_boxes, at_zero.pred_boxes)
    assert sparsity.induced_sparsity() == sparsity.natural_sparsity()


def test_threshold_flops_count_fc2_only_as_topk(model):
    """A skipped neuron saves d MACs (its fc2 column) under both oracles: both read fc1's output to decide."""
    batch = make_batch(padded=True)
    t = float(torch.cat([a.flatten() for a in real_activations(model, batch).values()]).quantile(0.8))
    saved = {}
    for policy in (Threshold(t), TopK(0.25)):
        flops = FlopCount()
        sparsity, activations, _ = masked_run(model, batch, {name: policy for name in BLOCKS}, flops)
        flops.add_images(2)
        skipped = 0
        for name, wrapper in sparsity.blocks.items():
            acts = activations[name]
            kept = int((acts > t).sum()) if isinstance(policy, Threshold) else acts.shape[0] * keep_count(0.25, H)
            assert int(wrapper.counts.kept) == kept
            assert wrapper.skipped_macs() == (acts.numel() - kept) * D
            skipped += (acts.numel() - kept) * D
        per_image = flops_per_image(flops, sparsity)
        closed_form_dense = sum(2 * 2 * activations[n].shape[0] * D * H for n in BLOCKS)
        assert per_image["ffn"]["dense"] * 2 == pytest.approx(closed_form_dense, rel=1e-9)
        assert per_image["ffn"]["as_run"] * 2 == pytest.approx(closed_form_dense - 2 * skipped, rel=1e-9)
        assert per_image["total"]["dense"] - per_image["total"]["as_run"] == pytest.approx(skipped, rel=1e-9)
        saved[policy.name] = skipped
    assert saved["threshold"] > 0 and saved["topk"] > 0


# ---------------------------------------------------------------- the masking stage on a tiny study

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny synthetic study's data and (3-step) model, made by the real stages, without MLflow."""
    work = tmp_path_factory.mktemp("threshold")
    params = tiny_params()
    params["masking"]["methods"] = ["topk", "threshold"]
    return untracked_study(work, params), work


def test_the_masking_stage_calibrates_and_evaluates_every_scope(tiny_study, tmp_path):
    cfg, work = tiny_study
    keep_ratio = 0.3
    rows_path = tmp_path / "rows.json"
    masking_stage.run_stage(cfg, Untracked(), method="threshold", keep_ratio=keep_ratio, model=work / "model",
                            data=work / "data", detections=tmp_path / "detections", rows=rows_path)
    rows = json.loads(rows_path.read_text())
    assert set(rows) == {"all", *BLOCKS}

    # the thresholds are those of an independent calibration on the calibration split, at target 1 - keep
    detr = load_detr(work / "model")
    calibration = evaluation_split(cfg, work / "data", cfg.profile["split"], scored=False)
    uniform = {n: per[0.7] for n, per in calibrate_thresholds(detr, calibration.loader, [0.7]).items()}
    _, allocated, _ = allocate_thresholds(detr, calibration.loader, 0.7)  # params.yaml: greedy
    assert cfg.masking["threshold_allocation"] == "greedy"
    assert calibration.split.name == "calibration" and calibration.images == TINY["data"]["splits"]["calibration"]
    for scope, row in rows.items():
        setting = row["setting"]
        masked, expected = (BLOCKS, allocated) if scope == "all" else ([scope], uniform)
        assert row["method"] == "threshold" and "k" not in setting
        assert setting["keep_ratio"] == keep_ratio and setting["target"] == 0.7 and setting["scope"] == scope
        assert setting.get("allocation") == ("greedy" if scope == "all" else None)
        assert setting["calibration_split"] == "calibration" and setting["calibration_images"] == calibration.images
        assert setting["thresholds"] == {n: expected[n].threshold for n in masked}
        assert setting["calibration_sparsity"] == {n: expected[n].calibration_sparsity for n in masked}
        assert setting["calibration_natural_sparsity"] == {n: expected[n].natural_sparsity for n in masked}
        if scope != "all":  # a block alone is at the target; all blocks are at it overall (the allocation's test)
            assert setting["calibration_sparsity"][scope] >= 0.7
        # on the evaluation split the masked blocks skip what the thresholds skip there (not exactly the target)
        for name in masked:
            assert row["induced_sparsity"]["per_block"][name] >= row["natural_sparsity"]["per_block"][name]
        for name in set(BLOCKS) - set(masked):
            assert row["induced_sparsity"]["per_block"][name] == 0.0
        assert row["ffn_flops"]["as_run"] < row["ffn_flops"]["dense"]

    # sharded: two shard jobs each calibrate and attach it; the gather job runs no model and writes the same rows
    shard_dirs = [tmp_path / f"shard-{i}" / "detections" for i in (1, 2)]
    for index, shard in enumerate(shard_dirs, start=1):
        masking_stage.run_stage(cfg, Untracked(), method="threshold", keep_ratio=keep_ratio, model=work / "model",
                                data=work / "data", detections=shard, rows=None, sharding=Sharding(index, 2))
    gathered_path = tmp_path / "gathered" / "rows.json"
    gathered_detections = tmp_path / "gathered" / "detections"
    masking_stage.run_stage(cfg, Untracked(), method="threshold", keep_ratio=keep_ratio, model=work / "model",
                            data=work / "data", detections=gathered_detections, rows=gathered_path,
                            sharding=Sharding(gather=tuple(shard_dirs), output=gathered_detections))
    gathered = json.loads(gathered_path.read_text())
    for scope, row in rows.items():
        other = gathered[scope]
        assert other.pop("detections") != row.pop("detections")
        assert other == row
