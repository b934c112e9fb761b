"""The FFN wrapper and its policies: exactness, counting (natural, induced, effective, FLOPs), padding, the
activation profile and the shrunk FFN, each checked against an independent computation on a small DETR."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from detr_sparsity.evaluation.flops import FlopCount, flops_per_image
from detr_sparsity.sparsity.ffn import SparseFFN, ffn_blocks, nonzero_per_token, sparse_ffns
from detr_sparsity.sparsity.policies import Policy, RandomKeep, StaticMask, TopK, keep_count
from detr_sparsity.sparsity.profile import profile_activations
from detr_sparsity.sparsity.shrink import shrink_ffns
from detr_sparsity.sparsity.sibs import compare_detections, static_keep_masks
from tiny_detr import BLOCKS, tiny_detr

D, H, QUERIES = 32, 256, 10
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": QUERIES, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1],
        "dropout": 0.1}  # as DETR-R50: the wrapper must follow the model's eval mode, where dropout does nothing


@pytest.fixture(scope="module")
def model():
    return tiny_detr(ARCH)


def make_batch(padded: bool, images: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(images, 3, 96, 128, generator=generator)
    pixel_mask = torch.ones(images, 96, 128, dtype=torch.long)
    if padded:  # the last image is narrower: its right part is padding, as in a batch of different sizes
        pixel_mask[-1, :, 64:] = 0
        pixel_values[-1, :, :, 64:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


@torch.no_grad()
def forward(model, batch):
    return model(**batch)


@torch.no_grad()
def real_encoder_tokens(model, batch) -> torch.Tensor:
    """The encoder's real positions, straight from the backbone (independent of the wrapper)."""
    _features, mask = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])[-1]
    return mask.flatten(1).bool()


@torch.no_grad()
def hidden_activations(model, batch) -> dict[str, torch.Tensor]:
    """Post-ReLU activations of every FFN block of the plain model, captured with forward hooks on fc1."""
    captured, handles = {}, []
    for name, block in ffn_blocks(model).items():
        handles.append(block.fc1.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, torch.relu(out))))
    forward(model, batch)
    for handle in handles:
        handle.remove()
    return captured


def test_dense_policy_is_bit_identical_and_removal_restores_the_model(model):
    batch = make_batch(padded=True)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_types = {name: type(block) for name, block in ffn_blocks(model).items()}
    plain = forward(model, batch)
    with sparse_ffns(model) as sparsity:
        assert all(isinstance(block, SparseFFN) for block in ffn_blocks(model).values())
        assert set(sparsity.blocks) == set(BLOCKS)
        wrapped = forward(model, batch)
    assert torch.equal(plain.logits, wrapped.logits)
    assert torch.equal(plain.pred_boxes, wrapped.pred_boxes)
    assert torch.equal(plain.last_hidden_state, wrapped.last_hidden_state)

    assert {name: type(block) for name, block in ffn_blocks(model).items()} == before_types
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert not model.model.backbone._forward_hooks
    assert torch.equal(forward(model, batch).logits, plain.logits)


def test_topk_at_keep_ratio_one_is_bit_identical(model):
    batch = make_batch(padded=True)
    plain = forward(model, batch)
    with sparse_ffns(model, {name: TopK(1.0) for name in BLOCKS}) as sparsity:
        masked = forward(model, batch)
    assert torch.equal(plain.logits, masked.logits) and torch.equal(plain.pred_boxes, masked.pred_boxes)
    assert sparsity.induced_sparsity()["overall"] == 0.0


def test_wrappers_that_do_not_count_compute_the_same_and_count_nothing(model):
    """Gate training wraps without counting: the same outputs as counting wrappers (top-k masks on every block,
    so masking runs), the encoder's token masks still set, no count taken, and an observer refused."""
    batch = make_batch(padded=True)
    policies = {name: TopK(0.25) for name in BLOCKS}
    with sparse_ffns(model, policies) as counting:
        counted = forward(model, batch)
    with sparse_ffns(model, policies, counting=False) as silent:
        uncounted = forward(model, batch)
        assert torch.equal(silent.blocks["encoder.0"].token_mask.bool(), real_encoder_tokens(model, batch))
        with pytest.raises(RuntimeError, match="do not count"):
            silent.add_observer(lambda *args: None)
    assert torch.equal(counted.logits, uncounted.logits) and torch.equal(counted.pred_boxes, uncounted.pred_boxes)
    assert counting.induced_sparsity()["overall"] == pytest.approx(0.75, abs=0.01)
    assert all(int(w.counts.tokens) == 0 and w.counts.all_tokens == 0 for w in silent.blocks.values())
    assert silent.induced_sparsity()["overall"] is None


def test_wrapper_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="no FFN block named encoder.7"):
        with sparse_ffns(model, {"encoder.7": TopK(0.5)}):
            pass
    with sparse_ffns(model):
        with pytest.raises(RuntimeError, match="already wrapped"):
            with sparse_ffns(model):
                pass
    assert not any(isinstance(b, SparseFFN) for b in ffn_blocks(model).values())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"keep_ratio = {bad} is not allowed"):
            keep_count(bad, H)


def test_natural_sparsity_counts_real_tokens_only(model):
    batch = make_batch(padded=True)
    real = real_encoder_tokens(model, batch)
    assert 0 < int(real.sum()) < real.numel(), "the batch must contain padding"
    activations = hidden_activations(model, batch)
    with sparse_ffns(model) as sparsity:
        forward(model, batch)
    for name, wrapper in sparsity.blocks.items():
        acts = activations[name]
        if name.startswith("encoder"):
            zeros, tokens = int(((acts == 0) & real[..., None]).sum()), int(real.sum())
        else:  # decoder queries are never padding
            zeros, tokens = int((acts == 0).sum()), acts.shape[0] * acts.shape[1]
        assert int(wrapper.counts.tokens) == tokens, name
        assert int(wrapper.counts.natural_zeros) == zeros, name
        assert sparsity.natural_sparsity()["per_block"][name] == zeros / (tokens * H)
    # dense: nothing skipped, effective == natural
    assert sparsity.induced_sparsity()["overall"] == 0.0
    assert sparsity.effective_sparsity() == sparsity.natural_sparsity()


def test_nonzero_per_token_is_count_nonzero_of_non_negative_values():
    values = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [1.0, 0.0, 2.5, 0.0],
                           [float("nan"), 0.0, float("inf"), 1e-42],  # NaN counts as nonzero, as does a subnormal
                           [3.0, 3.0, 3.0, 3.0]])
    assert nonzero_per_token(values).tolist() == [0, 2, 3, 4]
    assert nonzero_per_token(values).dtype == torch.int64
    generator = torch.Generator().manual_seed(0)
    activations = torch.relu(torch.randn(3, 50, 2048, generator=generator))
    activations[torch.rand(activations.shape, generator=generator) < 0.9] = 0.0
    assert torch.equal(nonzero_per_token(activations), torch.count_nonzero(activations, dim=-1))


@pytest.mark.parametrize("policy_class", [TopK, RandomKeep])
def test_masking_policies_keep_exactly_k_per_token(policy_class):
    generator = torch.Generator().manual_seed(0)
    activations = torch.relu(torch.randn(3, 7, H, generator=generator))
    policy = TopK(0.25) if policy_class is TopK else RandomKeep(0.25, seed=0, block="encoder.0")
    keep = policy.mask(None, activations)
    k = keep_count(0.25, H)
    assert keep.dtype == torch.bool and (keep.sum(-1) == k).all()
    if policy_class is TopK:  # every kept value is at least every dropped one, per token
        kept_min = activations.masked_fill(~keep, float("inf")).amin(-1)
        dropped_max = activations.masked_fill(keep, float("-inf")).amax(-1)
        assert (kept_min >= dropped_max).all()
    else:  # seeded: the same draws for the same seed and block, others for another block
        again = RandomKeep(0.25, seed=0, block="encoder.0").mask(None, activations)
        other = RandomKeep(0.25, seed=0, block="encoder.1").mask(None, activations)
        assert torch.equal(keep, again) and not torch.equal(keep, other)


@pytest.mark.parametrize("policy_name", ["topk", "random", "static"])
def test_induced_sparsity_and_skipped_flops_match_the_masks_applied(model, policy_name):
    batch = make_batch(padded=True)
    real = real_encoder_tokens(model, batch)
    keep_static = torch.arange(H) % 4 == 0  # a quarter of the neurons kept
    k = keep_count(0.25, H)

    def policy(name) -> Policy:
        return {"topk": TopK(0.25), "random": RandomKeep(0.25, 0, name), "static": StaticMask(keep_static)}[policy_name]

    flops = FlopCount()
    fc2_inputs: dict[str, torch.Tensor] = {}  # what fc2 really received: the recount of effective sparsity
    with sparse_ffns(model, {name: policy(name) for name in BLOCKS}) as sparsity, flops:
        hooks = [wrapper.block.fc2.register_forward_pre_hook(
            lambda _m, args, name=name: fc2_inputs.__setitem__(name, args[0].detach()))
            for name, wrapper in sparsity.blocks.items()]
        forward(model, batch)
        for hook in hooks:
            hook.remove()
    flops.add_images(2)
    tokens = {"encoder": int(real.sum()), "decoder": 2 * QUERIES}
    per_macs = D if policy_name == "topk" else 2 * D  # top-k must compute fc1 in full to rank
    skipped_total = 0
    for name, wrapper in sparsity.blocks.items():
        t = tokens[name.split(".")[0]]
        assert int(wrapper.counts.kept) == t * k
        assert sparsity.induced_sparsity()["per_block"][name] == pytest.approx(1 - k / H, abs=1e-12)
        assert wrapper.skipped_macs() == t * (H - k) * per_macs
        skipped_total += t * (H - k) * per_macs
    per_image = flops_per_image(flops, sparsity)
    closed_form_dense = sum(2 * 2 * tokens[n.split(".")[0]] * D * H for n in BLOCKS)  # real tokens only
    assert per_image["ffn"]["dense"] * 2 == pytest.approx(closed_form_dense, rel=1e-9)
    assert per_image["ffn"]["as_run"] * 2 == pytest.approx(closed_form_dense - 2 * skipped_total, rel=1e-9)
    # effective sparsity: hidden values that reach fc2 as zero (skipped or ReLU-zero), recounted from fc2's own
    # input over real tokens (the encoder's padding positions excluded with the backbone's mask)
    zeros, slots = 0, 0
    for name, hidden in fc2_inputs.items():
        rows = hidden[real] if name.startswith("encoder") else hidden.reshape(-1, H)
        zeros += int((rows == 0).sum())
        slots += rows.numel()
        assert sparsity.effective_sparsity()["per_block"][name] == pytest.approx(int((rows == 0).sum()) / rows.numel())
    assert sparsity.effective_sparsity()["overall"] == pytest.approx(zeros / slots)


def test_dense_ffn_flop_count_is_the_closed_form(model):
    """A dense FFN block's counted FLOPs are 2 x (tokens x 2 d H) multiply-accumulates."""
    batch = make_batch(padded=False)
    flops = FlopCount()
    with sparse_ffns(model) as sparsity, flops:
        forward(model, batch)
    for name, wrapper in sparsity.blocks.items():
        tokens = int(wrapper.counts.tokens)
        assert flops.block(name) == 2 * tokens * 2 * D * H == 2 * wrapper.dense_macs()
    # the plain model counts the same for its FFNs: the wrapper adds no matrix work of its own
    with FlopCounterMode(display=False) as plain:
        forward(model, batch)
    assert plain.get_total_flops() == flops.total()


def _small_batch(seed: int, width: int = 128) -> dict:
    batch = make_batch(padded=False, seed=seed)
    return {k: v[..., :width].contiguous() for k, v in batch.items()}


def test_flops_counted_per_input_shape_are_those_of_every_batch_counted(model):
    """`FlopCount.forward` counts an input shape twice and then adds those counts: over batches of two shapes
    the per-module totals must be FlopCounterMode's own over every forward."""
    batches = [_small_batch(seed, width) for seed, width in enumerate([128, 128, 96, 128, 96, 96, 128])]
    with sparse_ffns(model, {name: TopK(0.25) for name in BLOCKS}):
        flops = FlopCount()
        for batch in batches:
            with flops.forward(batch["pixel_values"]):
                forward(model, batch)
        with FlopCounterMode(display=False) as every:
            for batch in batches:
                forward(model, batch)
    assert flops.images == 2 * len(batches)
    assert flops.module_flops == {m: int(sum(ops.values())) for m, ops in every.get_flop_counts().items()}
    assert flops.total() > 0


class _DataShaped(torch.nn.Module):
    """A matmul over the rows of the input that are positive: its FLOPs follow the data, not the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x[:, 0] > 0] @ self.weight


def test_flops_that_vary_within_an_input_shape_are_counted_every_batch():
    module = _DataShaped()
    batches = [torch.tensor([[1.0] * 4, [-1.0] * 4]), torch.tensor([[1.0] * 4, [1.0] * 4]),
               torch.tensor([[1.0] * 4, [1.0] * 4]), torch.tensor([[-1.0] * 4, [-1.0] * 4])]
    flops = FlopCount()
    with torch.no_grad():
        for x in batches:
            with flops.forward(x):
                module(x)
    rows = [1, 2, 2, 0]  # positive rows per batch, each a (1 x 4) @ (4 x 3): 2 x 4 x 3 FLOPs per row
    assert flops.total() == sum(2 * 4 * 3 * r for r in rows)


def test_shrunk_ffn_computes_what_the_static_mask_computes(model):
    batch = make_batch(padded=True)
    generator = torch.Generator().manual_seed(3)
    keep = {name: torch.rand(H, generator=generator) > 0.6 for name in BLOCKS}
    with sparse_ffns(model, {name: StaticMask(k) for name, k in keep.items()}):
        masked = forward(model, batch)
    shrunk = shrink_ffns(copy.deepcopy(model), keep)
    for name, block in ffn_blocks(shrunk).items():
        assert block.fc1.out_features == block.fc2.in_features == int(keep[name].sum())
    small = forward(shrunk, batch)
    assert torch.allclose(masked.logits, small.logits, atol=1e-5)
    assert torch.allclose(masked.pred_boxes, small.pred_boxes, atol=1e-6)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())


def test_profile_statistics_match_a_direct_computation(model):
    batches = [make_batch(padded=True, seed=1), make_batch(padded=False, seed=2)]
    natural, profile = profile_activations(model, batches)
    neurons, per_image = profile.neurons(), profile.per_image_sparsity()
    fired = {name: torch.zeros(H) for name in BLOCKS}
    summed = {name: torch.zeros(H, dtype=torch.float64) for name in BLOCKS}
    tokens = {name: 0 for name in BLOCKS}
    expected_images = {name: [] for name in BLOCKS}
    for batch in batches:
        real = real_encoder_tokens(model, batch)
        for name, acts in hidden_activations(model, batch).items():
            mask = real if name.startswith("encoder") else torch.ones(acts.shape[:2], dtype=torch.bool)
            fired[name] += ((acts > 0) & mask[..., None]).sum((0, 1))
            summed[name] += (acts * mask[..., None]).sum((0, 1)).double()
            tokens[name] += int(mask.sum())
            for i in range(acts.shape[0]):
                expected_images[name].append(float(((acts[i] == 0) & mask[i][:, None]).sum()) / (int(mask[i].sum()) * H))
    for name in BLOCKS:
        assert torch.allclose(neurons[name]["firing_frequency"].double(), fired[name].double() / tokens[name])
        assert torch.allclose(neurons[name]["mean_activation"].double(), summed[name] / tokens[name], rtol=1e-4,
                              atol=1e-6)
        assert per_image[name].tolist() == pytest.approx(expected_images[name])
        # the mean firing frequency over neurons is one minus the token-weighted natural sparsity
        assert float(neurons[name]["firing_frequency"].double().mean()) == pytest.approx(
            1 - natural["per_block"][name], abs=1e-6)


def test_sibs_threshold_zero_keeps_every_neuron():
    indicators = {"encoder.0": torch.tensor([0.0, 0.2, 0.05, 1.0])}
    assert static_keep_masks(indicators, 0.0)["encoder.0"].all()
    assert static_keep_masks(indicators, 0.1)["encoder.0"].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="threshold = -1"):
        static_keep_masks(indicators, -1)


def test_compare_detections_reports_differences():
    a = [{"image_id": 1, "category_id": 2, "score": 0.5, "bbox": [0, 0, 10, 10]}]
    b = [{"image_id": 1, "category_id": 3, "score": 0.4, "bbox": [0, 0, 10, 12]}]
    assert compare_detections(a, a) == {"detections": 1, "label_mismatches": 0, "max_score_difference": 0.0,
                                        "max_box_difference_px": 0.0}
    diff = compare_detections(a, b)
    assert diff["label_mismatches"] == 1 and diff["max_box_difference_px"] == 2
    assert diff["max_score_difference"] == pytest.approx(0.1)
