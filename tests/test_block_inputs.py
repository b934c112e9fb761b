"""The FFN blocks' dense inputs cached for layer-local gate training: what fc1 reads, on real tokens only, optionally
a seeded subsample per image, saved and reloaded exactly, and built in the same dense pass as the front-end cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from detr_sparsity.cli import run_stage
from detr_sparsity.mgs.block_inputs import BlockInputs, build_gate_training_caches, record_block_inputs
from detr_sparsity.mgs.front_end import FrontEndCache, build_front_end_cache
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.stages import mgs_cache
from tiny_detr import BLOCKS, tiny_detr
from tiny_project import TINY, tiny_study

RESULTS = Path("results/synthetic")
D, QUERIES = 16, 10
ARCH = {"d_model": D, "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 2,
        "num_queries": QUERIES, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}


@pytest.fixture(scope="module")
def model():
    return tiny_detr(ARCH)


def batch(images=2, width=128, narrow=64, seed=1):
    """Pixels as the collate makes them: 96 x `width`, the last image `narrow` wide and padded on the right."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(images, 3, 96, width, generator=generator)
    pixel_mask = torch.ones(images, 96, width, dtype=torch.long)
    pixel_mask[-1, :, narrow:] = 0
    pixel_values[-1, :, :, narrow:] = 0
    labels = [{"class_labels": torch.randint(0, 4, (2,), generator=generator),
               "boxes": torch.rand(2, 4, generator=generator) * 0.5 + 0.25} for _ in range(images)]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


def record(model, batches, **settings) -> BlockInputs:
    with record_block_inputs(model, **settings) as recording, torch.no_grad():
        for b in batches:
            model(pixel_values=b["pixel_values"], pixel_mask=b["pixel_mask"])
    return recording.block_inputs()


def recount(model, b):
    """fc1's input in each block and the feature map's size, captured by plain hooks, and the real-token mask
    downsampled from the pixel mask here (as DETR does: nearest interpolation to the feature map's size)."""
    seen = {}
    handles = [block.fc1.register_forward_pre_hook(lambda _m, args, name=name: seen.update({name: args[0]}))
               for name, block in ffn_blocks(model).items()]
    handles.append(model.model.input_projection.register_forward_hook(
        lambda _m, _i, out: seen.update(feature_size=out.shape[-2:])))
    try:
        with torch.no_grad():
            model(pixel_values=b["pixel_values"], pixel_mask=b["pixel_mask"])
    finally:
        for handle in handles:
            handle.remove()
    real = torch.nn.functional.interpolate(b["pixel_mask"][None].float(), size=tuple(seen["feature_size"]))
    return seen, real[0].to(torch.bool).flatten(1)


def test_recorded_inputs_are_what_fc1_reads_on_the_real_tokens(model):
    b = batch()
    seen, real = recount(model, b)
    recorded = record(model, [b])
    assert recorded.blocks == BLOCKS and len(recorded) == 2
    for name in BLOCKS:
        x = seen[name]
        # Boolean indexing takes image 0's real tokens, then image 1's, each in row-major order.
        expected = x[real] if name.startswith("encoder") else x.reshape(-1, D)
        per_image = real.sum(1) if name.startswith("encoder") else torch.tensor([QUERIES, QUERIES])
        assert torch.equal(recorded.inputs[name], expected), name
        assert recorded.inputs[name].dtype == torch.float32 and recorded.inputs[name].device.type == "cpu"
        assert torch.equal(recorded.images[name], torch.arange(2).repeat_interleave(per_image)), name


def test_padded_encoder_tokens_are_left_out(model):
    # 96 x 128 and 96 x 64 padded to 96 x 128: at stride 16 a 6 x 8 map, of which the narrow image fills 6 x 4.
    recorded = record(model, [batch()])
    for i in range(2):
        assert recorded.image_token_counts(f"encoder.{i}").tolist() == [48, 24]
        assert recorded.image_token_counts(f"decoder.{i}").tolist() == [QUERIES, QUERIES]
    assert recorded.tokens() == {"encoder.0": 72, "encoder.1": 72, "decoder.0": 20, "decoder.1": 20}


def test_images_are_numbered_across_batches_in_the_front_end_cache_order(model):
    batches = [batch(seed=1), batch(images=3, narrow=96, seed=2)]
    front_end, recorded = build_gate_training_caches(model, batches)
    assert len(recorded) == len(front_end) == 5
    real_region = (front_end.shapes[:, 0] * front_end.shapes[:, 1]).tolist()
    assert real_region == [48, 24, 48, 48, 36]
    for name in BLOCKS:
        counts = recorded.image_token_counts(name).tolist()
        assert counts == (real_region if name.startswith("encoder") else [QUERIES] * 5), name
    assert torch.equal(recorded.inputs["encoder.0"][:72], record(model, batches[:1]).inputs["encoder.0"])


def test_subsample_keeps_at_most_k_real_tokens_per_image_and_block_drawn_from_the_full_set(model):
    batches = [batch(seed=1), batch(images=3, narrow=96, seed=2)]
    full = record(model, batches)
    k = 30
    sub = record(model, batches, tokens_per_image=k, seed=7)
    assert sub.tokens_per_image == k and sub.seed == 7 and len(sub) == 5
    for name in BLOCKS:
        counts, full_counts = sub.image_token_counts(name), full.image_token_counts(name)
        assert torch.equal(counts, full_counts.clamp(max=k)), name  # images with fewer keep all of theirs
        for image in range(5):
            kept = sub.inputs[name][sub.images[name] == image]
            everything = full.inputs[name][full.images[name] == image]
            match = (kept[:, None, :] == everything[None, :, :]).all(-1)  # (kept, all) equal rows
            assert match.any(1).all(), (name, image)  # each kept token is one of the image's real tokens
            positions = match.float().argmax(1)
            assert len(set(positions.tolist())) == len(kept) and torch.all(positions.diff() > 0)  # distinct, in order
    # Blocks draw their own positions: encoder.0 and encoder.1 keep different subsets of the 48-token images.
    positions = [torch.nonzero((sub.inputs[n][:k, None] == full.inputs[n][:48][None]).all(-1))[:, 1]
                 for n in ("encoder.0", "encoder.1")]
    assert not torch.equal(*positions)


def test_subsample_depends_on_the_seed_and_the_images_not_on_the_batching(model):
    # Equal-size images (no padding), so the tokens' values do not depend on the batch either.
    four = batch(images=4, narrow=128, seed=3)
    halves = [{"pixel_values": four["pixel_values"][i:i + 2], "pixel_mask": four["pixel_mask"][i:i + 2]}
              for i in (0, 2)]
    once = record(model, [four], tokens_per_image=10, seed=0)
    twice = record(model, halves, tokens_per_image=10, seed=0)
    other_seed = record(model, [four], tokens_per_image=10, seed=1)
    for name in BLOCKS:
        assert torch.equal(once.images[name], twice.images[name])
        torch.testing.assert_close(once.inputs[name], twice.inputs[name], rtol=0, atol=1e-5)
    assert not torch.equal(once.inputs["encoder.0"], other_seed.inputs["encoder.0"])
    again = record(model, [four], tokens_per_image=10, seed=0)
    assert all(torch.equal(once.inputs[n], again.inputs[n]) for n in BLOCKS)


def test_save_and_load_round_trip_exactly(model, tmp_path):
    recorded = record(model, [batch(), batch(images=3, narrow=96, seed=2)], tokens_per_image=20, seed=3)
    path = tmp_path / "block_inputs.safetensors"
    recorded.save(path)
    loaded = BlockInputs.load(path)
    assert loaded.blocks == recorded.blocks and len(loaded) == len(recorded) == 5
    assert (loaded.tokens_per_image, loaded.seed) == (20, 3)
    for name in BLOCKS:
        assert torch.equal(loaded.inputs[name], recorded.inputs[name])
        assert torch.equal(loaded.images[name], recorded.images[name]) and loaded.images[name].dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left beside it
    assert path.stat().st_mode & 0o644 == 0o644


def test_a_file_that_is_not_a_block_inputs_cache_is_refused_naming_it(model, tmp_path):
    path = tmp_path / "front_end.safetensors"
    build_front_end_cache(model, [batch()]).save(path)
    with pytest.raises(ValueError, match=f"^{path} is not a block-inputs cache"):
        BlockInputs.load(path)


def test_recording_leaves_no_hooks_and_refuses_a_negative_bound(model):
    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    record(model, [batch()])
    assert hooks() == before
    with pytest.raises(ValueError, match="tokens_per_image = -1 is not allowed"):
        record(model, [batch()], tokens_per_image=-1)
    assert hooks() == before


# ---------------------------------------------------------------- the stage: both caches from one dense pass

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny synthetic study's data and model, made by the real stages."""
    yield from tiny_study(tmp_path_factory.mktemp("block-inputs"))


@pytest.mark.parametrize("tokens_per_image", [None, 3])
def test_the_stage_writes_both_caches_from_one_dense_pass(study, monkeypatch, tokens_per_image):
    cfg, work = study
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    settings = dict(cfg.gate_training["cache"])  # images 8, batch size 4
    if tokens_per_image is not None:  # not in the schema yet: set on the parsed config
        settings["tokens_per_image"] = tokens_per_image
    cfg = replace(cfg, gate_training={**cfg.gate_training, "cache": settings})
    calls = {"model": 0, "backbone": 0}
    load_detr = mgs_cache.load_detr

    def counted(*args, **kwargs):
        detr = load_detr(*args, **kwargs)
        detr.register_forward_pre_hook(lambda *_: calls.update(model=calls["model"] + 1))
        detr.model.backbone.register_forward_pre_hook(lambda *_: calls.update(backbone=calls["backbone"] + 1))
        return detr

    monkeypatch.setattr(mgs_cache, "load_detr", counted)
    out = RESULTS / "mgs/cache/front_end.safetensors"
    block_inputs = RESULTS / "mgs/cache/block_inputs.safetensors"
    run_id = run_stage(cfg, "mgs_cache", model=RESULTS / "model", data=RESULTS / "data", out=out,
                       block_inputs=block_inputs)
    assert calls == {"model": 2, "backbone": 2}  # 8 images in batches of 4, once

    front_end, recorded = FrontEndCache.load(out), BlockInputs.load(block_inputs)
    assert len(front_end) == len(recorded) == 8
    assert recorded.blocks == ["encoder.0", "decoder.0"] and recorded.seed == cfg.seed
    real_region = front_end.shapes[:, 0] * front_end.shapes[:, 1]
    bound = tokens_per_image or 0
    assert bound < real_region.min()  # the bound, where set, leaves out tokens of every image
    assert recorded.tokens_per_image == bound
    assert recorded.image_token_counts("encoder.0").tolist() == (real_region.clamp(max=bound) if bound
                                                                 else real_region).tolist()
    queries = TINY["model"]["architecture"]["num_queries"]
    assert recorded.image_token_counts("decoder.0").tolist() == [min(queries, bound or queries)] * 8
    assert recorded.inputs["encoder.0"].shape[1] == TINY["model"]["architecture"]["d_model"]

    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["block_inputs_megabytes"] == pytest.approx(block_inputs.stat().st_size / 1e6)
    assert metrics["block_inputs_tokens_per_image"] == bound
    assert {k: int(v) for k, v in metrics.items() if k.startswith("block_input_tokens.")} == {
        f"block_input_tokens.{name}": count for name, count in recorded.tokens().items()}
