"""The synthetic COCO-format dataset: valid for pycocotools, populated as documented, and reproducible."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_sparsity.data.synthetic import SHAPE_CLASSES, SyntheticSpec, categories, generate_synthetic

SMALL = SyntheticSpec(num_images=12)  # default image size (256) and object counts (1-10), 6 classes
LARGE = SyntheticSpec(num_images=60)


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def all_files(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes); temporary files of atomic writes would show up too."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict, SyntheticSpec]:
    out = tmp_path_factory.mktemp("small")
    manifest = generate_synthetic(out, {"val": SMALL.num_images, "train": 3}, SMALL, seed=0)
    return out, manifest, SMALL


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> COCO:
    out = tmp_path_factory.mktemp("large")
    manifest = generate_synthetic(out, {"val": LARGE.num_images}, LARGE, seed=0)
    return load_coco(out / manifest["val"]["annotations"])


def test_images_rendered_in_several_processes_are_those_rendered_in_one(small, tmp_path):
    out, manifest, spec = small
    assert generate_synthetic(tmp_path, {"val": SMALL.num_images, "train": 3}, SMALL, seed=0, processes=3) == manifest
    assert all_files(tmp_path) == all_files(out)


def test_manifest_lists_every_split(small):
    out, manifest, _ = small
    assert manifest == {
        "train": {"annotations": "instances_train.json", "images": "images/train"},
        "val": {"annotations": "instances_val.json", "images": "images/val"},
    }
    for entry in manifest.values():
        assert (out / entry["annotations"]).is_file() and (out / entry["images"]).is_dir()
    # Atomic writes leave no temporary files behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_annotations_load_in_pycocotools_and_are_valid(small):
    out, manifest, spec = small
    coco = load_coco(out / manifest["val"]["annotations"])
    image_dir = out / manifest["val"]["images"]

    cat_ids = coco.getCatIds()
    assert len(cat_ids) == spec.num_classes == 6
    assert coco.dataset["categories"] == categories(6)
    assert [c["name"] for c in coco.loadCats(cat_ids)] == list(SHAPE_CLASSES)[:6]

    img_ids = coco.getImgIds()
    assert len(img_ids) == spec.num_images
    assert len({img["file_name"] for img in coco.dataset["images"]}) == spec.num_images
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)), "annotation ids must be unique"

    for img_id in img_ids:
        info = coco.loadImgs(img_id)[0]
        assert info["width"] == info["height"] == spec.image_size
        with Image.open(image_dir / info["file_name"]) as im:
            assert im.size == (spec.image_size, spec.image_size) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert spec.min_objects <= len(anns) <= spec.max_objects == 10 and spec.min_objects == 1
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= spec.image_size and y + h <= spec.image_size
            assert 0 < ann["area"] <= w * h  # pixel area of the shape, inside its box
            assert ann["category_id"] in cat_ids
            assert ann["iscrowd"] == 0


def test_object_counts_vary(large):
    per_image = Counter(a["image_id"] for a in large.dataset["annotations"])
    counts = [per_image.get(i, 0) for i in large.getImgIds()]
    assert min(counts) >= 1 and max(counts) <= 10
    assert len(set(counts)) >= 5, f"object counts barely vary: {sorted(set(counts))}"


def test_all_classes_and_coco_area_ranges_are_populated(large):
    anns = large.dataset["annotations"]
    assert {a["category_id"] for a in anns} == set(large.getCatIds())
    areas = [a["area"] for a in anns]
    small_, medium, large_ = (sum(1 for a in areas if a < 32**2),
                              sum(1 for a in areas if 32**2 <= a < 96**2),
                              sum(1 for a in areas if a >= 96**2))
    assert small_ > 0 and medium > 0 and large_ > 0, (small_, medium, large_)
    # COCOeval sees them too: ground truth in every area range.
    for name, (lo, hi) in zip(("small", "medium", "large"), ([0, 32**2], [32**2, 96**2], [96**2, 1e10])):
        assert large.getAnnIds(areaRng=[lo, hi]), f"no {name} objects for COCOeval"


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    spec = SyntheticSpec(num_images=4)
    splits = {"val": 4, "calibration": 2}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_synthetic(a, splits, spec, seed=7)
    generate_synthetic(b, splits, spec, seed=7)
    generate_synthetic(c, splits, spec, seed=8)
    files_a, files_b, files_c = all_files(a), all_files(b), all_files(c)
    assert len(files_a) == 2 + 4 + 2  # two annotation files, six images
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    differing = [name for name in files_a if files_a[name] != files_c[name]]
    # Every image and every annotation file changes with the seed.
    assert sorted(differing) == sorted(files_a)


def test_adding_a_split_leaves_other_splits_unchanged(tmp_path):
    spec = SyntheticSpec(num_images=3)
    generate_synthetic(tmp_path / "one", {"val": 3}, spec, seed=0)
    generate_synthetic(tmp_path / "two", {"train": 2, "val": 3}, spec, seed=0)
    one, two = all_files(tmp_path / "one"), all_files(tmp_path / "two")
    assert one and set(one) < set(two)
    assert {name: two[name] for name in one} == one
    # ... while the splits themselves are different images (per-split seeds differ).
    assert two["images/train/000001.jpg"] != two["images/val/000001.jpg"]


@pytest.mark.parametrize("image_size", [64, 128])
def test_image_sizes_the_schema_allows_can_be_generated(tmp_path, image_size):
    # workflow/schemas/params.schema.yaml allows image_size >= 64; every such size must generate, with every
    # box inside the image.
    spec = SyntheticSpec(num_images=20, image_size=image_size)
    manifest = generate_synthetic(tmp_path, {"val": 20}, spec, seed=0)
    instances = json.loads((tmp_path / manifest["val"]["annotations"]).read_text())
    assert len(instances["images"]) == 20
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image_size and y + h <= image_size and ann["area"] > 0
