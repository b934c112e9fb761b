"""Bootstrap AP from one COCOeval matching: the weighted accumulation against pycocotools' COCOeval itself.

The known answers are COCOeval's own stats[0] and stats[1] on the original images, on subsets of them, and on
files where images are duplicated under new ids; the cases are small random COCO files written to tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_sparsity.evaluation.bootstrap import (bootstrap_interval, match_detections, paired_bootstrap_interval,
                                                resample_weights, resampled_ap)
from detr_sparsity.evaluation.coco_eval import coco_ap

WIDTH, HEIGHT = 640, 480


def random_case(seed: int, images: int = 12, categories: int = 5, detections_per_image: int | None = None,
                score_decimals: int | None = None) -> tuple[dict, list[dict]]:
    """A COCO instances dict and results list with what COCOeval treats specially.

    Image ids are sparse and listed out of order; the last category has no ground truth (but detections), the one
    before only crowd boxes; some boxes elsewhere are crowd; some images have no ground truth, some no
    detections; one image has more than 100 detections of one category (COCOeval keeps the best 100). Detections
    are jittered ground truth (IoUs across the thresholds), duplicates and false positives. With
    `detections_per_image`, every image gets that many detections, as DETR scores every query.
    """
    rng = np.random.default_rng(seed)
    image_ids = [int(i) for i in rng.permutation(np.arange(1, 4 * images + 1))[:images]]
    category_ids = [3 * c + 1 for c in range(categories)]
    no_ground_truth, crowd_only = category_ids[-1], category_ids[-2]
    annotations = []
    for image_id in image_ids:
        if rng.random() < 0.15:
            continue  # an image without ground truth
        for _ in range(rng.integers(1, 7)):
            category = int(rng.choice(category_ids[:-1]))
            w, h = rng.uniform(8, 200), rng.uniform(8, 200)
            box = [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]
            crowd = int(category == crowd_only or rng.random() < 0.1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": w * h, "iscrowd": crowd})

    def score() -> float:
        s = float(rng.uniform(0.01, 1.0))
        return round(s, score_decimals) if score_decimals is not None else s

    def jitter(box, spread):
        x, y, w, h = box
        return [x + rng.normal(0, spread * w), y + rng.normal(0, spread * h),
                w * float(np.exp(rng.normal(0, spread))), h * float(np.exp(rng.normal(0, spread)))]

    def false_positive():
        w, h = rng.uniform(8, 150), rng.uniform(8, 150)
        return [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]

    results = []
    without_detections = set(rng.choice(image_ids, size=max(1, images // 6), replace=False).tolist())
    by_image = {i: [a for a in annotations if a["image_id"] == i] for i in image_ids}
    for image_id in image_ids:
        if image_id in without_detections:
            continue
        found = []
        for a in by_image[image_id]:
            for _ in range(rng.choice([0, 1, 1, 2])):  # missed, found, found twice
                category = a["category_id"] if rng.random() < 0.9 else int(rng.choice(category_ids))
                found.append((category, jitter(a["bbox"], rng.uniform(0.02, 0.3))))
        for _ in range(rng.integers(0, 4)):
            found.append((int(rng.choice(category_ids)), false_positive()))
        if rng.random() < 0.3:
            found.append((no_ground_truth, false_positive()))
        if detections_per_image is not None:
            while len(found) < detections_per_image:
                found.append((int(rng.choice(category_ids)), false_positive()))
            found = found[:detections_per_image]
        results += [{"image_id": image_id, "category_id": c, "bbox": b, "score": score()} for c, b in found]
    # More than maxDets of one category in one image, some of them hits, so the truncation is visible.
    crowded = next(i for i in image_ids if i not in without_detections and by_image[i])
    target = next(a for a in by_image[crowded])
    results += [{"image_id": crowded, "category_id": target["category_id"],
                 "bbox": jitter(target["bbox"], 0.05) if k % 10 == 0 else false_positive(), "score": score()}
                for k in range(110)]
    instances = {"info": {}, "licenses": [], "categories": [{"id": c, "name": f"c{c}"} for c in category_ids],
                 "images": [{"id": i, "width": WIDTH, "height": HEIGHT, "file_name": f"{i}.jpg"} for i in image_ids],
                 "annotations": annotations}
    return instances, results


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


def cocoeval_stats(annotations: str, detections: str, image_ids=None) -> tuple[float, float]:
    """COCOeval's stats[0] (AP) and stats[1] (AP50), on `image_ids` only where given."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


def duplicated(instances: dict, results: list[dict], multiplicity: dict[int, int]) -> tuple[dict, list[dict]]:
    """The files of a resample: each image `multiplicity[id]` times, copies under new ids (after every old one)."""
    next_image = max(im["id"] for im in instances["images"]) + 1
    next_annotation = max((a["id"] for a in instances["annotations"]), default=0) + 1
    images, annotations, detections = [], [], []
    for image in instances["images"]:
        for copy in range(multiplicity.get(image["id"], 1)):
            new_id = image["id"] if copy == 0 else next_image
            next_image += copy > 0
            images.append(image | {"id": new_id})
            for a in instances["annotations"]:
                if a["image_id"] == image["id"]:
                    annotations.append(a | {"id": next_annotation, "image_id": new_id})
                    next_annotation += 1
            detections += [d | {"image_id": new_id} for d in results if d["image_id"] == image["id"]]
    return instances | {"images": images, "annotations": annotations}, detections


CASES = [dict(seed=0), dict(seed=1, images=20, categories=6), dict(seed=2, images=8, categories=3),
         dict(seed=3, score_decimals=2)]  # the last with tied scores


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_all_ones_reproduce_cocoeval(tmp_path, case):
    instances, results = random_case(**case)
    annotations, detections = write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results)
    ap, ap50 = cocoeval_stats(annotations, detections)
    assert 0 < ap < ap50 < 1  # a case where every part of the curve counts
    matched = match_detections(annotations, detections)
    ones = np.ones(len(matched.image_ids))
    got = resampled_ap(matched, ones)
    assert got["AP"] == pytest.approx(ap, abs=1e-12) and got["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert coco_ap(annotations, detections)["AP"] == ap  # the shared evaluate() step changed nothing there
    many = resampled_ap(matched, np.stack([ones, ones]))  # the batched path, rows independent
    assert many["AP"].shape == (2,) and np.all(many["AP"] == got["AP"]) and np.all(many["AP50"] == got["AP50"])


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_a_subset_reproduces_cocoeval_on_those_images(tmp_path, case):
    instances, results = random_case(**case)
    annotations, detections = write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results)
    matched = match_detections(annotations, detections)
    rng = np.random.default_rng(10)
    subsets = [rng.random(len(matched.image_ids)) < 0.5 for _ in range(3)]
    got = resampled_ap(matched, np.stack(subsets).astype(float))
    for row, keep in enumerate(subsets):
        kept = [i for i, k in zip(matched.image_ids, keep) if k]
        ap, ap50 = cocoeval_stats(annotations, detections, image_ids=kept)
        assert got["AP"][row] == pytest.approx(ap, abs=1e-12)
        assert got["AP50"][row] == pytest.approx(ap50, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_weight_two_image_reproduces_cocoeval_with_that_image_duplicated(tmp_path, seed):
    instances, results = random_case(seed)
    matched = match_detections(write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results))
    # an image with ground truth and detections, so that the duplicate changes both recall and precision
    doubled = next(i for i in matched.image_ids
                   if any(a["image_id"] == i and not a["iscrowd"] for a in instances["annotations"])
                   and any(d["image_id"] == i for d in results))
    weights = np.array([2.0 if i == doubled else 1.0 for i in matched.image_ids])
    gt2, dt2 = duplicated(instances, results, {doubled: 2})
    ap, ap50 = cocoeval_stats(write(tmp_path, "gt2.json", gt2), write(tmp_path, "dt2.json", dt2))
    got = resampled_ap(matched, weights)
    assert got["AP"] == pytest.approx(ap, abs=1e-12) and got["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert got["AP"] != pytest.approx(resampled_ap(matched, np.ones_like(weights))["AP"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_bootstrap_resamples_reproduce_cocoeval_on_the_resampled_files(tmp_path, seed):
    instances, results = random_case(seed, images=15)
    matched = match_detections(write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results))
    weights = resample_weights(len(matched.image_ids), 3, seed=seed)
    assert weights.sum(axis=1).tolist() == [len(matched.image_ids)] * 3 and weights.max() >= 2
    got = resampled_ap(matched, weights)
    for row, counts in enumerate(weights):
        gt, dt = duplicated(instances, results, dict(zip(matched.image_ids, counts.tolist())))
        ap, ap50 = cocoeval_stats(write(tmp_path, f"gt{row}.json", gt), write(tmp_path, f"dt{row}.json", dt))
        assert got["AP"][row] == pytest.approx(ap, abs=1e-12)
        assert got["AP50"][row] == pytest.approx(ap50, abs=1e-12)


def test_a_resample_without_scored_ground_truth_is_minus_one_as_in_cocoeval(tmp_path):
    instances, results = random_case(0)
    annotations, detections = write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results)
    matched = match_detections(annotations, detections)
    scored = {a["image_id"] for a in instances["annotations"] if not a["iscrowd"]}
    weights = np.array([0.0 if i in scored else 1.0 for i in matched.image_ids])
    assert cocoeval_stats(annotations, detections, [i for i, w in zip(matched.image_ids, weights) if w]) == (-1, -1)
    assert resampled_ap(matched, weights) == {"AP": -1.0, "AP50": -1.0}


def test_weights_of_the_wrong_shape_or_sign_are_refused(tmp_path):
    instances, results = random_case(0)
    matched = match_detections(write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results))
    with pytest.raises(ValueError, match="one weight per image"):
        resampled_ap(matched, np.ones(len(matched.image_ids) + 1))
    with pytest.raises(ValueError, match="non-negative"):
        resampled_ap(matched, -np.ones(len(matched.image_ids)))


def test_intervals_are_deterministic_for_a_seed_and_contain_the_point(tmp_path):
    instances, results = random_case(4, images=60, categories=4)
    annotations, detections = write(tmp_path, "gt.json", instances), write(tmp_path, "dt.json", results)
    first = bootstrap_interval(annotations, detections, resamples=300, seed=7)
    assert first == bootstrap_interval(annotations, detections, resamples=300, seed=7)
    assert first != bootstrap_interval(annotations, detections, resamples=300, seed=8)
    ap, ap50 = cocoeval_stats(annotations, detections)
    assert first["AP"] == pytest.approx(ap, abs=1e-12) and first["AP50"] == pytest.approx(ap50, abs=1e-12)
    for metric in ("AP", "AP50"):
        assert first[f"{metric}_low"] < first[metric] < first[f"{metric}_high"]
    assert {k: first[k] for k in ("level", "resamples", "seed", "images", "undefined_resamples")} == \
        {"level": 0.95, "resamples": 300, "seed": 7, "images": 60, "undefined_resamples": 0}
    narrower = bootstrap_interval(annotations, detections, resamples=300, seed=7, level=0.5)
    assert first["AP_low"] < narrower["AP_low"] < narrower["AP_high"] < first["AP_high"]


def test_paired_intervals_use_the_same_images_for_both(tmp_path):
    instances, results = random_case(4, images=60, categories=4)
    rng = np.random.default_rng(0)
    # a worse method: the same detections, boxes loosened and a third of them dropped
    worse = [d | {"bbox": [d["bbox"][0] + rng.normal(0, 4), d["bbox"][1] + rng.normal(0, 4)] + d["bbox"][2:]}
             for d in results if rng.random() > 0.33]
    annotations = write(tmp_path, "gt.json", instances)
    a, b = write(tmp_path, "dense.json", results), write(tmp_path, "sparse.json", worse)
    paired = paired_bootstrap_interval(annotations, b, a, resamples=200, seed=3)
    assert paired == paired_bootstrap_interval(annotations, b, a, resamples=200, seed=3)
    # the same weights by hand: each metric per resample, then the percentiles of difference and ratio
    weights = resample_weights(60, 200, seed=3)
    spread_b = resampled_ap(match_detections(annotations, b), weights)
    spread_a = resampled_ap(match_detections(annotations, a), weights)
    for metric in ("AP", "AP50"):
        difference = np.percentile(spread_b[metric] - spread_a[metric], [2.5, 97.5])
        ratio = np.percentile(spread_b[metric] / spread_a[metric], [2.5, 97.5])
        assert [paired[f"{metric}_difference_low"], paired[f"{metric}_difference_high"]] == difference.tolist()
        assert [paired[f"{metric}_ratio_low"], paired[f"{metric}_ratio_high"]] == ratio.tolist()
        assert paired[f"{metric}_ratio"] == paired[f"{metric}_a"] / paired[f"{metric}_b"] < 1
        assert paired[f"{metric}_difference_low"] < paired[f"{metric}_difference"] < paired[f"{metric}_difference_high"]
        assert paired[f"{metric}_ratio_undefined_resamples"] == 0
    alone = bootstrap_interval(annotations, b, resamples=200, seed=3)
    assert (paired["AP_a"], paired["AP_a_low"], paired["AP_a_high"]) == (alone["AP"], alone["AP_low"], alone["AP_high"])
    itself = paired_bootstrap_interval(annotations, a, a, resamples=50, seed=0)
    assert itself["AP_difference_low"] == itself["AP_difference_high"] == 0
    assert itself["AP_ratio_low"] == itself["AP_ratio_high"] == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_the_studys_comparisons_are_each_pairs_own_paired_interval(tmp_path, processes):
    """The summary's comparisons, its detection files resampled one at a time or two at a time, each equal to the
    paired interval of its two files computed alone (the function above, checked against COCOeval)."""
    from detr_sparsity.reporting.comparisons import comparisons

    instances, results = random_case(5, images=40, categories=4)
    annotations = write(tmp_path, "gt.json", instances)
    rng = np.random.default_rng(1)

    def loosened(name: str, spread: float, keep: float) -> str:
        return write(tmp_path, name, [d | {"bbox": [d["bbox"][0] + rng.normal(0, spread)] + d["bbox"][1:]}
                                      for d in results if rng.random() < keep])

    def row(method: str, setting: dict | None, detections: str) -> dict:
        return {"method": method, "setting": setting, "annotations": annotations, "detections": detections}

    rows = [row("dense", None, write(tmp_path, "dense.json", results)),
            row("mgs", {"objective": "distillation", "target": 0.9}, loosened("mgs.json", 3, 0.8)),
            row("topk", {"keep_ratio": 0.1}, loosened("topk.json", 1, 0.9)),
            row("threshold", {"keep_ratio": 0.1}, loosened("threshold.json", 2, 0.85))]
    found = comparisons(rows, resamples=100, seed=4, level=0.9, processes=processes)
    expected = {("mgs", "dense"), ("topk", "dense"), ("threshold", "dense"), ("mgs", "topk"), ("mgs", "threshold")}
    assert {(c["row"]["method"], c["reference"]["method"]) for c in found["comparisons"]} == expected
    files = {r["method"]: r["detections"] for r in rows}
    for c in found["comparisons"]:
        alone = paired_bootstrap_interval(annotations, files[c["row"]["method"]], files[c["reference"]["method"]],
                                          resamples=100, seed=4, level=0.9)
        assert {k: c[k] for k in alone if k in c} == {k: v for k, v in alone.items() if k in c}
        assert c["AP_ratio"] == alone["AP_ratio"] and c["AP50_difference_low"] == alone["AP50_difference_low"]
    assert found["images"] == 40 and len(found["detections"]) == 4
