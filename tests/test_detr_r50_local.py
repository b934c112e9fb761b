"""The COCO study's code path for DETR-R50, without the hub: a randomly initialised DETR-R50-shaped model in a
local directory goes through the real model stage and the real evaluation (DETR's 800/1333 input, padding,
every query scored, COCOeval, natural sparsity, FLOP counting, MLflow run).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import transformers
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from detr_sparsity import tracking
from detr_sparsity.cli import run_stage
from detr_sparsity.config import load_config
from detr_sparsity.pipeline import stage_params
from detr_sparsity.data.dataset import CocoDetection, DetrCollate, image_processor, load_split, verify_splits
from detr_sparsity.evaluation.coco_eval import AP_METRICS, coco_ap
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.profile import load_indicator

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "params.schema.yaml"

D_MODEL, FFN, LAYERS, QUERIES, LABELS = 256, 2048, 6, 100, 91
# (height, width) of the two images: COCO-like, portrait and landscape, so a batch of both is padded.
IMAGE_SIZES = {1: (800, 1066), 2: (1066, 800)}
PIPELINE_RUN = "test-detr-r50-local"


def detr_r50_config() -> transformers.DetrConfig:
    backbone = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                         hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                         out_features=["stage4"])
    return transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=D_MODEL,
                                   encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_layers=LAYERS,
                                   decoder_layers=LAYERS, num_queries=QUERIES, num_labels=LABELS)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> Path:
    """A randomly initialised DETR-R50 saved with save_pretrained (what a local copy of the hub model looks like)."""
    path = tmp_path_factory.mktemp("detr-r50")
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(detr_r50_config())
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A tiny COCO-format split directory as the data stage writes it: instances JSON, images, splits.json."""
    root = tmp_path_factory.mktemp("coco-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for image_id, (h, w) in IMAGE_SIZES.items():
        # Blocky random colours: JPEG-friendly, not a constant image.
        blocks = rng.integers(0, 256, size=(h // 100 + 1, w // 100 + 1, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(root / "images" / f"{image_id:012d}.jpg",
                                                                   quality=90)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
    boxes = [(1, 1, [100.0, 150.0, 300.0, 500.0]), (1, 18, [600.0, 400.0, 200.0, 150.0]),
             (2, 1, [50.0, 80.0, 400.0, 800.0]), (2, 18, [500.0, 900.0, 25.0, 20.0])]
    annotations = [{"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
                    "iscrowd": 0} for i, (img, cat, bbox) in enumerate(boxes, start=1)]
    instances = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
                 "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                                {"id": 18, "name": "dog", "supercategory": "animal"}]}
    (root / "instances_val.json").write_text(json.dumps(instances))
    entry = {"annotations": "instances_val.json", "images": "images"}
    manifest = verify_splits(root, {"val": entry, "train": entry, "calibration": entry})  # with the images' digests
    (root / "splits.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def stages(tmp_path_factory, detr_dir, data_dir) -> dict:
    """The coco study's config pointing at the local model; the model stage and the dense evaluation, run for real."""
    work = tmp_path_factory.mktemp("study")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["study"] = "coco"
    raw["studies"]["coco"]["model"]["name_or_path"] = str(detr_dir)
    raw["studies"]["coco"]["evaluate"]["batch_size"] = 2
    (work / "workflow" / "schemas").mkdir(parents=True)
    shutil.copy(SCHEMA, work / "workflow" / "schemas" / SCHEMA.name)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv(tracking.PIPELINE_RUN_ENV, PIPELINE_RUN)
        cfg = load_config(work / "params.yaml")
        tracking.init_store(cfg)
        model_dir = work / "results" / "coco" / "model"
        model_run_id = run_stage(cfg, "model", data=data_dir, out=model_dir)
        info = json.loads((model_dir / "model_info.json").read_text())
        detections = work / "results" / "coco" / "detections" / "dense.json"
        row_path = work / "results" / "coco" / "rows" / "dense.json"
        run_stage(cfg, "evaluate", method="dense", model=model_dir, data=data_dir, detections=detections, row=row_path)
        yield {"cfg": cfg, "work": work, "uri": uri, "info": info, "model_dir": model_dir,
               "model_run_id": model_run_id, "detections": detections, "row_path": row_path,
               "row": json.loads(row_path.read_text())}
        mlflow.set_tracking_uri(None)  # leave no process-wide MLflow state behind


# ---------------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def source_model(detr_dir) -> transformers.DetrForObjectDetection:
    return load_detr(detr_dir)


@pytest.fixture(scope="module")
def stage_model(stages) -> transformers.DetrForObjectDetection:
    return load_detr(stages["model_dir"])


@pytest.mark.parametrize("which", ["source_model", "stage_model"])
def test_loaded_model_has_detr_r50_shape(request, which):
    model = request.getfixturevalue(which)
    assert not model.training
    assert model.config.backbone_config.model_type == "resnet"
    assert len(model.model.encoder.layers) == LAYERS and len(model.model.decoder.layers) == LAYERS
    assert model.config.d_model == D_MODEL
    for layer in (*model.model.encoder.layers, *model.model.decoder.layers):
        assert (layer.mlp.fc1.in_features, layer.mlp.fc1.out_features) == (D_MODEL, FFN)
        assert (layer.mlp.fc2.in_features, layer.mlp.fc2.out_features) == (FFN, D_MODEL)
    assert model.model.query_position_embeddings.num_embeddings == QUERIES == model.config.num_queries
    assert model.config.num_labels == LABELS
    assert model.class_labels_classifier.out_features == LABELS + 1  # + "no object"


def test_model_stage_copies_the_local_model(source_model, stage_model, stages, detr_dir):
    source, copy_ = source_model.state_dict(), stage_model.state_dict()
    assert source.keys() == copy_.keys()
    assert all(torch.equal(source[k], copy_[k]) for k in source)
    info = json.loads((stages["model_dir"] / "model_info.json").read_text())
    assert info == stages["info"]
    # A local directory has no revision (that selects a commit of a hub repository): none is recorded.
    assert info["name_or_path"] == str(detr_dir) and "revision" not in info
    assert info["weights_sha256"] == {"model.safetensors": hashlib.sha256(
        (stages["model_dir"] / "model.safetensors").read_bytes()).hexdigest()}
    assert info["parameters"] == sum(p.numel() for p in source_model.parameters())
    processor = json.loads((stages["model_dir"] / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 800, "longest_edge": 1333}


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def test_every_query_of_every_image_is_a_detection(stages):
    detections = json.loads(stages["detections"].read_text())
    assert len(detections) == len(IMAGE_SIZES) * QUERIES
    for image_id in IMAGE_SIZES:
        assert sum(d["image_id"] == image_id for d in detections) == QUERIES
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert isinstance(d["category_id"], int) and 0 <= d["category_id"] < LABELS
        assert len(d["bbox"]) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in d["bbox"])
        assert 0 < d["score"] <= 1
        # Boxes are in the original image's pixels (sigmoid-bounded centre/size, scaled by the image size).
        h, w = IMAGE_SIZES[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert -w <= x <= w and -h <= y <= h and 0 <= bw <= w + 0.01 and 0 <= bh <= h + 0.01


def test_row_metrics_are_cocoeval_of_its_own_files(stages, data_dir):
    row = stages["row"]
    assert row["method"] == "dense" and row["images"] == len(IMAGE_SIZES)
    assert Path(row["detections"]) == stages["detections"]
    assert Path(row["annotations"]) == data_dir / "instances_val.json"
    recomputed = coco_ap(row["annotations"], row["detections"])
    assert set(recomputed) == set(AP_METRICS)
    for name in AP_METRICS:
        assert row[name] == recomputed[name], name
        assert row[name] == -1.0 or 0.0 <= row[name] <= 1.0


def padded_batch_shape(cfg, data_dir) -> tuple[torch.Size, torch.Tensor]:
    """pixel_values shape and pixel_mask of the evaluation batch, as the evaluation's collate builds it."""
    dataset = CocoDetection(load_split(data_dir, "val"))
    batch = DetrCollate(image_processor(cfg.input), with_labels=False)([dataset[0], dataset[1]])
    return batch["pixel_values"].shape, batch["pixel_mask"]


def test_natural_sparsity_covers_all_twelve_ffn_blocks(stages):
    row = stages["row"]
    natural = row["natural_sparsity"]
    assert 0.0 <= natural["overall"] <= 1.0
    assert set(natural["per_block"]) == {f"{part}.{i}" for part in ("encoder", "decoder") for i in range(LAYERS)}
    assert all(0.0 <= v <= 1.0 for v in natural["per_block"].values())
    assert min(natural["encoder"], natural["decoder"]) <= natural["overall"] <= max(natural["encoder"],
                                                                                    natural["decoder"])
    # Dense evaluation: nothing induced, effective == natural.
    assert row["induced_sparsity"]["overall"] == 0.0
    assert set(row["induced_sparsity"]["per_block"]) == set(natural["per_block"])
    assert row["effective_sparsity"] == natural


def test_natural_sparsity_counts_real_encoder_tokens_only(stages, data_dir):
    # Each encoder block's fraction is zeros / (real tokens x FFN), where real tokens are the positions of the
    # downsampled pixel mask that are not padding; decoder blocks count all 2 x 100 query positions.
    shape, mask = padded_batch_shape(stages["cfg"], data_dir)
    side = math.ceil(1066 / 32)
    real = int(torch.nn.functional.interpolate(mask[None].float(), size=(side, side)).to(torch.bool).sum())
    padded = shape[0] * side * side
    assert 0 < real < padded
    per_block = stages["row"]["natural_sparsity"]["per_block"]
    for name, fraction in per_block.items():
        denominator = (real if name.startswith("encoder") else shape[0] * QUERIES) * FFN
        zeros = fraction * denominator
        assert abs(zeros - round(zeros)) < 1e-6, (name, zeros)
    # Counting padded positions instead would not give whole numbers of zeros.
    assert any(abs(f * padded * FFN - round(f * padded * FFN)) > 1e-3
               for n, f in per_block.items() if n.startswith("encoder"))


def test_ffn_flops_match_closed_form_for_the_real_tokens(stages, data_dir, stage_model):
    cfg = stages["cfg"]
    shape, mask = padded_batch_shape(cfg, data_dir)
    # 800x1066 and 1066x800 are already at DETR's 800/1333 size; one batch pads both to 1066x1066.
    assert tuple(shape) == (2, 3, 1066, 1066)
    assert 0 < int(mask.sum()) < mask.numel(), "the batch must contain padding"
    # The encoder's sequence length: the backbone's last feature map for that padded batch (shapes only).
    with torch.device("meta"):
        meta = transformers.DetrForObjectDetection(stage_model.config)
    feature_map, _ = meta.model.backbone(torch.empty(shape, device="meta"),
                                         torch.ones(shape[0], *shape[2:], dtype=torch.long, device="meta"))[-1]
    tokens = feature_map.shape[-2] * feature_map.shape[-1]
    side = math.ceil(1066 / 32)
    assert tokens == side ** 2
    real = int(torch.nn.functional.interpolate(mask[None].float(), size=(side, side)).to(torch.bool).sum())
    # FFN FLOPs cover real tokens only: fc1 + fc2, 2 FLOPs per MAC, for the 2 images of the split.
    encoder = 2 * 2 * real * D_MODEL * FFN * LAYERS
    decoder = 2 * 2 * shape[0] * QUERIES * D_MODEL * FFN * LAYERS
    row = stages["row"]
    assert row["ffn_flops"]["dense"] == pytest.approx((encoder + decoder) / shape[0], rel=1e-6)
    assert row["ffn_flops"]["as_run"] == row["ffn_flops"]["dense"]
    assert row["total_flops"]["dense"] > row["ffn_flops"]["dense"]
    assert row["total_flops"]["as_run"] == row["total_flops"]["dense"]
    assert "2 x multiply-accumulates" in row["flops_convention"]


def test_mlflow_runs_are_finished_and_tagged(stages):
    cfg, row = stages["cfg"], stages["row"]
    client = MlflowClient(tracking_uri=stages["uri"])
    experiment = client.get_experiment_by_name(cfg.experiment)
    assert experiment is not None and cfg.experiment == "detr-sparsity-coco"

    run = client.get_run(row["mlflow_run_id"])
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["study"] == "coco" and tags["stage"] == "evaluate" and tags["setting"] == "method=dense"
    assert tags["git_commit"]
    assert tags["params_hash"] == tracking.params_hash(stage_params(cfg, "evaluate"))
    assert tags["pipeline_run"] == PIPELINE_RUN
    for name in AP_METRICS:
        assert run.data.metrics[name] == pytest.approx(row[name])
    assert run.data.metrics["natural_sparsity"] == pytest.approx(row["natural_sparsity"]["overall"])
    assert run.data.metrics["ffn_gflops"] == pytest.approx(row["ffn_flops"]["dense"] / 1e9)
    assert run.data.params["evaluate.batch_size"] == "2" and run.data.params["study"] == "coco"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert stages["row_path"].name in artifacts

    model_run = client.get_run(stages["model_run_id"])
    assert model_run.info.status == "FINISHED"
    assert model_run.data.tags["stage"] == "model"
    assert model_run.data.tags["params_hash"] == tracking.params_hash(stage_params(cfg, "model"))
    assert model_run.data.params["model.name_or_path"] == cfg.model["name_or_path"]


# ---------------------------------------------------------------------------------------------------------
# Activation analysis on the padded batch


@pytest.mark.slow
def test_profile_and_sibs_stages_count_real_tokens_of_the_padded_batch(stages, data_dir):
    cfg, work, model_dir = stages["cfg"], stages["work"], stages["model_dir"]
    results = work / "results" / "coco"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", stages["uri"])
        neurons = results / "profile" / "neurons.safetensors"
        run_stage(cfg, "profile", model=model_dir, data=data_dir, profile=results / "profile" / "profile.json",
                  neurons=neurons)
        threshold = 0.5
        run_stage(cfg, "sibs", threshold=threshold, model=model_dir, data=data_dir, neurons=neurons,
                  detections=results / "sibs" / "detections.json", row=results / "sibs" / "row.json")
    profile = json.loads((results / "profile" / "profile.json").read_text())
    row = json.loads((results / "sibs" / "row.json").read_text())

    # The calibration split here holds the val images: the profile counts exactly what the dense row counted.
    assert profile["natural_sparsity"] == stages["row"]["natural_sparsity"]
    shape, mask = padded_batch_shape(cfg, data_dir)
    side = math.ceil(1066 / 32)
    real = int(torch.nn.functional.interpolate(mask[None].float(), size=(side, side)).to(torch.bool).sum())
    for i in range(LAYERS):
        assert profile["per_block"][f"encoder.{i}"]["tokens"] == real < shape[0] * side * side
        assert profile["per_block"][f"decoder.{i}"]["tokens"] == shape[0] * QUERIES
    assert len(profile["per_image_sparsity"]["encoder.0"]) == len(IMAGE_SIZES)

    # SIBS: the kept neurons come from the saved profile; FLOPs follow from them in closed form.
    kept = row["shrunk_ffn"]["kept_neurons"]
    firing = load_indicator(neurons, "firing_frequency")
    assert kept == {name: int((values >= threshold).sum()) for name, values in firing.items()}
    assert 0 < row["induced_sparsity"]["overall"] < 1
    tokens = {name: real if name.startswith("encoder") else shape[0] * QUERIES for name in kept}
    as_run = sum(2 * tokens[n] * D_MODEL * 2 * kept[n] for n in kept) / shape[0]
    assert row["ffn_flops"]["as_run"] == pytest.approx(as_run, rel=1e-9)
    assert row["shrunk_ffn"]["label_mismatches"] == 0
    assert coco_ap(row["annotations"], row["detections"]) == {k: row[k] for k in AP_METRICS}


# ---------------------------------------------------------------------------------------------------------
# MGS on the COCO study's path: portrait and landscape images, the hub model format


@pytest.mark.slow
def test_mgs_stages_and_the_gated_model_on_detr_r50(stages, data_dir):
    from dataclasses import replace

    from detr_sparsity.evaluation.detections import detect
    from detr_sparsity.evaluation.evaluate import evaluation_split
    from detr_sparsity.execution.gated_detr import load_gated_detr
    from detr_sparsity.mgs.block_inputs import BlockInputs
    from detr_sparsity.mgs.front_end import FrontEndCache
    from detr_sparsity.models.front_end import cached_front_end

    budget = {"cache": {"split": "train", "images": 0, "batch_size": 2, "tokens_per_image": 0},
              "local": {"steps": 2, "batch_tokens": 64, "learning_rate": 0.01, "pos_weight": 1.0, "held_out": 0.5},
              "training": {"steps": 2, "batch_size": 2, "learning_rate": 0.01, "multiplier_rate": 0.05,
                           "target_warmup": 0.0, "checkpoint_every": 1, "warm_start": True}}
    cfg, model_dir = replace(stages["cfg"], gate_training=budget), stages["model_dir"]
    out = stages["work"] / "results" / "coco" / "mgs"
    run_stage(cfg, "mgs_cache", model=model_dir, data=data_dir, out=out / "cache.safetensors",
              block_inputs=out / "block_inputs.safetensors")
    cache = FrontEndCache.load(out / "cache.safetensors")
    # Each image's real feature region, as DETR's mask marks it: the landscape 800 x 1066 and portrait 1066 x 800
    # images share a batch padded to 1066 x 1066 (34 x 34 at stride 32), where 800 px become 26 rows.
    assert cache.shapes.tolist() == [[26, 34], [34, 26]]
    # The FFN blocks' inputs from the same pass: each image's real tokens only, every decoder query.
    inputs = BlockInputs.load(out / "block_inputs.safetensors")
    assert len(inputs) == 2 and len(inputs.blocks) == 2 * LAYERS
    assert inputs.image_token_counts("encoder.5").tolist() == [26 * 34, 34 * 26]
    assert inputs.image_token_counts("decoder.5").tolist() == [QUERIES, QUERIES]
    data = evaluation_split(cfg, data_dir)
    model = load_detr(model_dir)
    pixels = next(iter(data.loader))
    batch = cache.batch([0, 1])
    with torch.no_grad():
        full = model(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"])
        with cached_front_end(model) as front:
            cached = model(**front.inputs(batch["features"], batch["mask"]))
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-4)

    # The layer-local group_activity gates, then distillation gates started from them and calibrated.
    local = out / "local" / "gates.safetensors"
    run_stage(cfg, "mgs_local", model=model_dir, block_inputs=out / "block_inputs.safetensors", gates=local,
              training=out / "local" / "training.json")
    local_record = json.loads((out / "local" / "training.json").read_text())
    assert local_record["steps"] == 2 and len(local_record["blocks"]) == 2 * LAYERS
    assert "distillation" in cfg.mgs["objectives"]
    run_stage(cfg, "mgs_train", model=model_dir, cache=out / "cache.safetensors", local=local, out=out / "trained")
    gates, training = out / "distillation" / "gates.safetensors", out / "distillation" / "training.json"
    run_stage(cfg, "mgs_calibrate", objective="distillation", target=0.5, model=model_dir, data=data_dir,
              local=local, trained=out / "trained", gates=gates, training=training)
    record = json.loads(training.read_text())
    assert record["final"]["steps"] == 2 and len(record["blocks"]) == 2 * LAYERS
    assert record["local"]["mlflow_run_id"] == local_record["mlflow_run_id"]
    assert record["trained_target"] == cfg.mgs["train_target"]
    assert record["calibration"]["split"] == "calibration"
    detections, row_path = out / "distillation" / "detections.json", out / "distillation" / "row.json"
    run_stage(cfg, "mgs_evaluate", objective="distillation", target=0.5, model=model_dir, data=data_dir, gates=gates,
              training=training, detections=detections, row=row_path)
    row = json.loads(row_path.read_text())
    assert {k: row[k] for k in AP_METRICS} == coco_ap(data.split.annotations, detections)
    assert set(row["induced_sparsity"]["per_block"]) == set(record["blocks"])

    # The model to take away, from the hub-format directory and the gate file: the evaluated detections.
    gated = load_gated_detr(model_dir, gates)
    assert detect(gated, data.processor, data.loader) == json.loads(detections.read_text())
