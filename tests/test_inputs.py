"""Inputs are verified where they enter and checked where they are read: the data stage decodes every image,
checks every annotation and records each image's sha256; every stage that reads an image checks it against that
digest; the model's weights are checked against the digest the model stage recorded; ground truth that nothing can
be scored against is refused before detection. Every failure names the file (and the annotation or the split) and
leaves no output that looks complete.

The stages run for real (`cli.run_stage`, with an MLflow store) on the end-to-end tests' tiny synthetic study.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from detr_sparsity.cli import run_stage
from detr_sparsity.data import synthetic
from detr_sparsity.data.dataset import (DIGESTS, MANIFEST, CocoDetection, DataError, load_split, read_instances,
                                        verify_split)
from detr_sparsity.evaluation.coco_eval import GroundTruthError, coco_ap
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.models.load import MODEL_INFO, WeightsError, load_detr
from detr_sparsity.reporting import tables
from detr_sparsity.reporting.records import StudyRecord
from detr_sparsity.stages import data as data_stage
from tiny_project import TINY, tiny_study

RESULTS = Path("results/synthetic")
CHANGED = "changed after the data stage verified it"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny synthetic study's data and model, made by the real stages once; tests work on copies."""
    yield from tiny_study(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def project(study, tmp_path, monkeypatch):
    """A fresh copy of the study's data and model in the working directory; returns the config."""
    cfg, work = study
    for name in ("data", "model"):
        shutil.copytree(work / RESULTS / name, tmp_path / RESULTS / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    return cfg


def evaluate(cfg):
    out = RESULTS / "evaluate/dense"
    run_stage(cfg, "evaluate", method="dense", model=RESULTS / "model", data=RESULTS / "data",
              detections=out / "detections.json", row=out / "row.json")
    return out


def edit_annotations(path: Path, change) -> None:
    instances = json.loads(path.read_text())
    change(instances)
    path.write_text(json.dumps(instances))


# ---------------------------------------------------------------------------------------------------------
# Where inputs enter: the data stage


def test_the_manifest_records_each_images_digest_and_nothing_else_changes(study, tmp_path):
    cfg, work = study
    data = work / RESULTS / "data"
    manifest = json.loads((data / MANIFEST).read_text())
    assert set(manifest) == {"train", "calibration", "val"}
    for name, entry in manifest.items():
        images = sorted(p.name for p in (data / entry["images"]).iterdir())
        assert entry[DIGESTS] == {f: hashlib.sha256((data / entry["images"] / f).read_bytes()).hexdigest()
                                  for f in images}
    # The images and annotation files are the generator's, byte for byte: only splits.json gained the digests.
    spec = synthetic.SyntheticSpec(num_images=0, **{k: TINY["data"][k] for k in (
        "image_size", "num_classes", "min_objects", "max_objects", "count_decay")})
    plain = synthetic.generate_synthetic(tmp_path, TINY["data"]["splits"], spec, cfg.seed)
    generated = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    staged = {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert staged.pop(MANIFEST) and staged == generated
    assert {n: {k: v for k, v in e.items() if k != DIGESTS} for n, e in manifest.items()} == plain


@pytest.mark.parametrize("fault", ["truncated image", "unknown image_id"])
def test_a_bad_input_fails_the_data_stage_naming_it_and_leaves_no_output(project, monkeypatch, fault):
    generate = synthetic.generate_synthetic

    def generate_then_spoil(out_dir, *args):
        manifest = generate(out_dir, *args)
        if fault == "truncated image":
            image = out_dir / "images/val/000002.jpg"
            image.write_bytes(image.read_bytes()[:1534])
        else:
            edit_annotations(out_dir / "instances_val.json",
                             lambda d: d["annotations"][3].update(image_id=999999))
        return manifest

    monkeypatch.setattr(data_stage, "generate_synthetic", generate_then_spoil)
    shutil.rmtree(RESULTS / "data")
    with pytest.raises(DataError) as error:
        run_stage(project, "data", out=RESULTS / "data")
    if fault == "truncated image":
        assert "images/val/000002.jpg does not decode fully: image file is truncated" in str(error.value)
    else:
        assert str(error.value).endswith("instances_val.json: annotation 4 has image_id 999999, which is not an image "
                                         "of the file (6 images, ids 1, 2, 3, 4, 5, 6)")
    assert sorted(p.name for p in RESULTS.iterdir()) == ["model"]  # no data output, no temporary leftover


@pytest.mark.parametrize("fault, message", [
    ("corrupt JSON", "{path} is not valid JSON (a COCO instances file): "),
    ("unknown category_id", "{path}: annotation 1 has category_id 99, which is not a category of the file "
                            "(categories: 1, 2, 3, 4, 5, 6); 16 more annotations too"),
    ("no image list", "{path} is not a COCO instances file: 'images' is missing or not a list"),
    ("missing image", "image {images}/000003.jpg not found"),
])
def test_annotation_files_and_images_are_checked_where_they_enter(project, fault, message):
    data = RESULTS / "data"
    path, images = data / "instances_val.json", data / "images/val"
    if fault == "corrupt JSON":
        path.write_bytes(path.read_bytes()[:200])
    elif fault == "unknown category_id":
        edit_annotations(path, lambda d: [a.update(category_id=99) for a in d["annotations"]])
    elif fault == "no image list":
        edit_annotations(path, lambda d: d.pop("images"))
    else:
        (images / "000003.jpg").unlink()
    entry = {"annotations": "instances_val.json", "images": "images/val"}
    with pytest.raises(DataError) as error:
        verify_split(data, "val", entry)
    assert str(error.value).startswith(message.format(path=path, images=images))
    assert fault != "corrupt JSON" or str(error.value).endswith("line 1 column 201 (char 200)")


# ---------------------------------------------------------------------------------------------------------
# Where images are read: every stage


@pytest.mark.parametrize("stage, image", [("evaluate", "val/000002.jpg"), ("model", "train/*.jpg"),
                                          ("mgs_cache", "train/000003.jpg")])
def test_a_truncated_image_fails_every_stage_that_reads_it_naming_the_file(project, stage, image):
    # Pretraining's 3 steps see a random 12 of the 16 train images: all are cut, and the first one read is named.
    for path in (RESULTS / "data/images").glob(image):
        with path.open("r+b") as f:  # truncate -s 1534
            f.truncate(1534)
    with pytest.raises(DataError) as error:
        if stage == "evaluate":
            evaluate(project)
        elif stage == "model":
            shutil.rmtree(RESULTS / "model")
            run_stage(project, "model", data=RESULTS / "data", out=RESULTS / "model")
        else:
            run_stage(project, "mgs_cache", model=RESULTS / "model", data=RESULTS / "data",
                      out=RESULTS / "mgs/cache/front_end.safetensors",
                      block_inputs=RESULTS / "mgs/cache/block_inputs.safetensors")
    named = str(error.value).split(" ")[1]
    assert Path(named).match(str(RESULTS / "data/images" / image)) and Path(named).is_file()
    assert str(error.value).startswith(f"image {named} {CHANGED} (sha256 ")
    assert str(error.value).endswith("...): restore it, or rerun the data stage to verify the new file")
    left = sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file())
    assert not [p for p in left if not p.startswith(("data/", "model/", "checkpoints/"))], left
    if stage == "model":
        assert not (RESULTS / "model").exists()


def test_an_image_replaced_by_another_valid_image_is_caught(project):
    val = RESULTS / "data/images/val"
    shutil.copy(val / "000001.jpg", val / "000002.jpg")  # decodes fine: only the digest tells
    with pytest.raises(DataError, match=f"image {val / '000002.jpg'} {CHANGED}"):
        evaluate(project)
    assert not (RESULTS / "evaluate").exists()


def test_a_read_image_is_the_file_decoded_and_the_manifest_must_hold_digests(project):
    from PIL import Image

    split = load_split(RESULTS / "data", "val")
    image, target = CocoDetection(split)[1]
    with Image.open(split.images / "000002.jpg") as direct:
        assert image.tobytes() == direct.convert("RGB").tobytes()
    assert target["image_id"] == 2
    manifest = json.loads((RESULTS / "data" / MANIFEST).read_text())
    del manifest["val"][DIGESTS]
    (RESULTS / "data" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"splits\.json records no image digests for split 'val' \(written by an "
                                        r"older data stage\); rerun the data stage"):
        load_split(RESULTS / "data", "val")


# ---------------------------------------------------------------------------------------------------------
# No silent non-results


@pytest.mark.parametrize("fault, why", [
    ("annotations: []", "its ground truth is empty (annotations: [])"),
    ("all crowd", "all 17 of its annotations are crowd regions, which COCOeval does not score"),
])
def test_ground_truth_that_nothing_can_be_scored_against_is_refused_before_detection(project, fault, why):
    path = RESULTS / "data/instances_val.json"
    if fault == "all crowd":
        edit_annotations(path, lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    else:
        edit_annotations(path, lambda d: d.update(annotations=[]))
    with pytest.raises(GroundTruthError) as error:
        evaluate(project)
    assert str(error.value) == f"cannot evaluate on the val split ({path}): {why}"
    assert not (RESULTS / "evaluate").exists()  # no detections, no row with AP -1
    # Reading activations (profile, benchmark) needs no ground truth.
    assert evaluation_split(project, RESULTS / "data", scored=False).images == 6


def test_ground_truth_of_no_category_is_refused_before_detection_naming_the_annotation(project):
    path = RESULTS / "data/instances_val.json"
    edit_annotations(path, lambda d: [a.update(category_id=99) for a in d["annotations"]])
    with pytest.raises(DataError) as error:
        evaluate(project)
    assert str(error.value) == (f"{path}: annotation 1 has category_id 99, which is not a category of the file "
                                "(categories: 1, 2, 3, 4, 5, 6); 16 more annotations too")
    assert not (RESULTS / "evaluate").exists()


def test_coco_ap_refuses_ground_truth_of_no_category(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                                   "score": 0.9}]))
    with pytest.raises(GroundTruthError, match=r"gt\.json: none of its 1 annotations has a category of the file "
                                               r"\(their category_ids: 7; categories: 1\)"):
        coco_ap(tmp_path / "gt.json", tmp_path / "dt.json")


def test_an_empty_area_range_stays_minus_one_and_reads_n_a_with_its_footnote():
    dense = {"method": "dense", "setting": None, "AP": 0.3, "AP50": 0.5, "AP75": 0.3, "APs": -1.0, "APm": 0.2,
             "APl": 0.4, "images": 4500, "natural_sparsity": {"overall": 0.7, "per_block": {"encoder.0": 0.7}},
             "ffn_flops": {"dense": 1e9}, "total_flops": {"dense": 4e9},
             "split_note": "4,500 of the 5,000 val2017 images (500 are held out for the train and calibration "
                           "splits); published val2017 results, such as the 42.0 AP of DETR-R50, are measured on all "
                           "5,000"}
    profile = {"split": "calibration", "images": 10, "natural_sparsity": {"overall": 0.7},
               "per_image_sparsity": {"encoder.0": [0.6, 0.8]},
               "per_block": {"encoder.0": {"natural_sparsity": 0.7, "never_firing_neurons": 3}}}
    t1 = tables.t1_dense(StudyRecord([dense]), profile)
    text = t1.markdown()
    assert "| 0.300 | 0.500 | 0.300 | n/a | 0.200 | 0.400 |" in text
    assert "n/a: the split holds no object in that area range" in text
    assert "COCO AP on 4500 evaluation images (not the whole of val2017: see the note)" in text
    assert f"Evaluation images: {dense['split_note']}." in text and dense["split_note"] in t1.latex()


def test_rows_say_what_part_of_its_source_the_evaluation_covers(project):
    manifest_path = RESULTS / "data" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["val"]["note"] = "6 of the 9 val images (3 are held out)"
    manifest_path.write_text(json.dumps(manifest))
    row = json.loads((evaluate(project) / "row.json").read_text())
    assert row["split_note"] == "6 of the 9 val images (3 are held out)" and row["images"] == 6


# ---------------------------------------------------------------------------------------------------------
# Model weights


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 4000, len(data) - 3936):  # inside the tensors, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["cut to 1,000 bytes", "bytes flipped"])
def test_weights_that_changed_are_refused_naming_the_file(project, fault):
    weights = RESULTS / "model/model.safetensors"
    recorded = json.loads((RESULTS / "model" / MODEL_INFO).read_text())["weights_sha256"]
    assert recorded == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    if fault == "bytes flipped":
        flip_bytes(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    message = (f"weights file {weights} is not the one the model stage saved (sha256 "
               f"{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}..., {RESULTS / 'model' / MODEL_INFO} records "
               f"{recorded['model.safetensors'][:16]}...): it changed or was cut short; restore it, or rerun the model "
               "stage")
    with pytest.raises(WeightsError) as error:
        load_detr(RESULTS / "model")
    assert str(error.value) == message
    if fault == "bytes flipped":  # today this gave exit 0 and AP 0.0
        with pytest.raises(WeightsError, match="is not the one the model stage saved"):
            evaluate(project)
        assert not (RESULTS / "evaluate").exists()


def test_unreadable_weights_without_a_record_name_the_file(project):
    model = RESULTS / "model"
    (model / MODEL_INFO).unlink()  # a local copy of a model that no stage recorded
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(WeightsError) as error:
        load_detr(model)
    assert str(error.value).startswith(f"cannot load the DETR saved in {model}: weights file "
                                       f"{model / 'model.safetensors'} cannot be read (SafetensorError: ")
    assert "invalid header length" in str(error.value)


def test_instances_files_are_read_with_their_checks(project):
    path = RESULTS / "data/instances_val.json"
    assert len(read_instances(path)["images"]) == 6
    edit_annotations(path, lambda d: d["annotations"][0].update(id=d["annotations"][1]["id"]))
    with pytest.raises(DataError, match=f"{path}: annotations id 2 occurs more than once"):
        CocoDetection(load_split(RESULTS / "data", "val"))
