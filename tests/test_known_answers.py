"""Known answers for the numbers the study reports: COCO AP, the detections AP is computed from, and each
term the MGS gates learn from. Every expected value is worked out by hand in the test (plain Python, no
call into the code under test), so a test fails when the code computes something else.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

from detr_sparsity.config import InputSize
from detr_sparsity.data.dataset import DetrCollate, image_processor
from detr_sparsity.evaluation.coco_eval import coco_ap
from detr_sparsity.evaluation.detections import detect
from detr_sparsity.mgs.calibration import calibrate_gates
from detr_sparsity.mgs.front_end import build_front_end_cache
from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.mgs.objectives import distillation_loss, objective_loss, oracle_loss
from detr_sparsity.mgs.training import GateTraining, train_gates
from detr_sparsity.sparsity.ffn import ffn_blocks, sparse_ffns
from tiny_detr import ARCH, D, G, H, batches, tiny_detr


@pytest.fixture(scope="module")
def model():
    return tiny_detr()


def pixel_batches(n_batches=2, images=4, padded=True) -> list[dict]:
    """Pixel batches as the collate makes them; with `padded`, the last image of a batch is narrower. Class labels
    1..4, the categories' own ids."""
    return batches(n_batches, images, padded, label_range=(1, 5))

# =========================================================================================================
# COCO AP


def _instances(images, annotations, categories) -> dict:
    return {"info": {}, "licenses": [], "images": images, "categories": categories,
            "annotations": [{"id": i, "image_id": img, "category_id": cat, "bbox": list(box),
                             "area": box[2] * box[3], "iscrowd": 0}
                            for i, (img, cat, box) in enumerate(annotations, start=1)]}


def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


def _iou(a, b) -> float:
    """IoU of two [x, y, w, h] boxes, for the comments' claims below."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_ground_truth_given_back_as_detections_scores_ap_one(tmp_path):
    # Three categories, boxes of every COCO area range (small < 32^2 <= medium < 96^2 <= large), two images.
    images = [{"id": 1, "width": 640, "height": 480, "file_name": "1.jpg"},
              {"id": 2, "width": 480, "height": 640, "file_name": "2.jpg"}]
    gt = [(1, 1, (10, 20, 200, 150)), (1, 2, (300, 40, 20, 25)), (1, 3, (400, 300, 60, 70)),
          (2, 1, (50, 60, 40, 50)), (2, 2, (100, 300, 300, 300)), (2, 3, (5, 5, 12, 8)), (2, 3, (200, 10, 150, 90))]
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    annotations = _write(tmp_path, "gt.json", _instances(images, gt, categories))
    detections = _write(tmp_path, "dt.json", [{"image_id": img, "category_id": cat, "bbox": list(box), "score": 1.0}
                                             for img, cat, box in gt])
    result = coco_ap(annotations, detections)
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in result.items():  # the mean of 101 ones, up to float rounding
        assert value == pytest.approx(1.0, abs=1e-12), name


def _category_ap_by_hand(hits: list[bool], ground_truth: int) -> Fraction:
    """COCO's AP of one category at one IoU threshold, exactly: `hits` are its detections ranked by score over all
    images (True: matched a ground-truth box). Precision and recall after each rank; the precision made
    non-increasing from the right (the envelope); at each of the 101 recall thresholds r = 0, 0.01, ..., 1 the
    envelope at the first rank whose recall >= r (0 if recall never reaches r); their mean."""
    tp = list(itertools.accumulate(int(h) for h in hits))
    recall = [Fraction(t, ground_truth) for t in tp]
    precision = [Fraction(t, rank + 1) for rank, t in enumerate(tp)]
    envelope = [max(precision[i:]) for i in range(len(hits))]
    at_threshold = [next((envelope[i] for i in range(len(hits)) if recall[i] >= Fraction(r, 100)), Fraction(0))
                    for r in range(101)]
    return sum(at_threshold) / 101


def test_ap_of_a_known_mix_of_hits_and_misses_is_the_hand_computed_value(tmp_path):
    images = [{"id": 1, "width": 640, "height": 480, "file_name": "1.jpg"},
              {"id": 2, "width": 640, "height": 480, "file_name": "2.jpg"}]
    A, B = (20, 30, 100, 100), (400, 300, 120, 110)  # image 1, category 1
    C, E = (100, 100, 200, 100), (350, 200, 150, 150)  # image 2: C category 1, E category 2
    M = (50, 350, 50, 50)  # image 2, category 3: the only medium box (32^2 <= 2500 < 96^2); all others are large
    gt = [(1, 1, A), (1, 1, B), (2, 1, C), (2, 2, E), (2, 3, M)]
    categories = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 3, "name": "three"}]
    near_c = (102, 100, 200, 100)
    near_b = (428, 300, 120, 110)
    assert _iou(near_c, C) == pytest.approx(198 / 202)  # 0.980: a hit at every IoU threshold 0.50:0.05:0.95
    assert _iou(near_b, B) == pytest.approx(92 / 148)  # 0.622: a hit at 0.50, 0.55, 0.60; a miss from 0.65 on
    assert _iou(A, B) == _iou(C, E) == _iou(near_b, A) == _iou(M, C) == _iou(M, E) == 0
    dt = [
        (1, 1, A, 0.9),  # rank 1: hits A
        (1, 1, A, 0.8),  # rank 2: a duplicate of A: A is taken, B does not overlap -> false positive
        (2, 1, near_c, 0.7),  # rank 3: hits C
        (2, 1, E, 0.6),  # rank 4: on E's box, but E is category 2 -> false positive for category 1
        (1, 1, near_b, 0.55),  # rank 5: hits B up to IoU threshold 0.60, a false positive above
        (2, 2, E, 0.5),  # category 2: hits E
        (2, 3, M, 0.4),  # category 3: hits M
    ]
    annotations = _write(tmp_path, "gt.json", _instances(images, gt, categories))
    detections = _write(tmp_path, "dt.json", [{"image_id": i, "category_id": c, "bbox": list(b), "score": s}
                                             for i, c, b, s in dt])

    # Category 1 (3 boxes; 3 is chosen so that no recall lands exactly on a recall threshold):
    # IoU threshold <= 0.60: ranks TP FP TP FP TP
    #   recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5, envelope 1 2/3 2/3 3/5 3/5
    #   r in [0, 1/3]: 34 thresholds at 1; (1/3, 2/3]: 33 at 2/3; (2/3, 1]: 34 at 3/5 -> (34 + 22 + 20.4) / 101
    # IoU threshold >= 0.65: ranks TP FP TP FP FP: the last 34 thresholds at 0 -> (34 + 22) / 101
    low = _category_ap_by_hand([True, False, True, False, True], 3)
    high = _category_ap_by_hand([True, False, True, False, False], 3)
    assert low == Fraction(764, 1010) and high == Fraction(56, 101)
    # Categories 2 and 3: one box each, found first: precision 1 at every recall threshold, at every IoU threshold.
    assert _category_ap_by_hand([True], 1) == 1
    # AP is the mean over the 10 IoU thresholds (3 of them <= 0.60) of the mean over categories with ground
    # truth in the area range. Large: categories 1 and 2; medium: category 3 alone; small: none (COCOeval: -1).
    ap50, ap75 = (low + 2) / 3, (high + 2) / 3
    expected = {
        "AP": float((3 * ap50 + 7 * ap75) / 10),
        "AP50": float(ap50),
        "AP75": float(ap75),
        "APs": -1.0,
        "APm": 1.0,
        "APl": float((3 * (low + 1) / 2 + 7 * (high + 1) / 2) / 10),
    }
    assert len(set(expected.values())) == 6  # a metric reported under another's name would show
    result = coco_ap(annotations, detections)
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name

# =========================================================================================================
# detect(): model outputs -> COCO detections


class _StubDetr(torch.nn.Module):
    """Stands in for DetrForObjectDetection: returns fixed logits and boxes, whatever the pixels."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.boxes = logits, boxes
        self.calls = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, pixel_values, pixel_mask):
        self.calls.append(tuple(pixel_values.shape))
        return DetrObjectDetectionOutput(logits=self.logits, pred_boxes=self.boxes)


def test_detect_gives_coco_boxes_labels_and_scores_in_original_pixels():
    # Two non-square images: 300 wide x 200 high, and 160 wide x 240 high (width, height as PIL takes them).
    images = [(Image.new("RGB", (300, 200), (120, 30, 200)), {"image_id": 7, "annotations": []}),
              (Image.new("RGB", (160, 240), (10, 200, 60)), {"image_id": 42, "annotations": []})]
    batch = DetrCollate(image_processor(InputSize(64, 64)), with_labels=False)(images)
    # Six logits per query: real classes 0..4 and DETR's "no object" last. Logits are logs of weights, so
    # the softmax probabilities are the weights over their sum.
    weights = [
        [[1, 1, 1, 6, 1, 2],  # class 3 wins: 6/12 = 0.5
         [2, 8, 1, 1, 1, 3],  # class 1 wins: 8/16 = 0.5
         [1, 1, 1, 1, 3, 9]],  # "no object" dominates; the best real class is 4: 3/16 = 0.1875
        [[5, 1, 1, 1, 1, 1],  # class 0 wins: 5/10 = 0.5
         [1, 1, 2, 1, 1, 2],  # class 2 wins: 2/8 = 0.25
         [1, 1, 1, 1, 12, 4]],  # class 4 wins: 12/20 = 0.6
    ]
    logits = torch.tensor(weights, dtype=torch.float32).log()
    # Boxes as DETR predicts them: (centre x, centre y, width, height), relative to the image; dyadic values,
    # so every pixel coordinate below is exact.
    boxes = torch.tensor([
        [[0.25, 0.625, 0.125, 0.5], [0.5, 0.25, 0.75, 0.25], [0.875, 0.5, 0.25, 1.0]],
        [[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.125], [0.625, 0.125, 0.25, 0.0625]],
    ])
    model = _StubDetr(logits, boxes)
    found = detect(model, image_processor(InputSize(64, 64)), [batch])
    assert model.calls == [tuple(batch["pixel_values"].shape)]
    # By hand: x = (cx - w/2) * W, y = (cy - h/2) * H, w * W, h * H, with (W, H) the original image's size.
    # Image 7 (W 300, H 200):
    #   (0.25, 0.625, 0.125, 0.5)  -> x (0.25 - 0.0625) * 300 = 56.25, y (0.625 - 0.25) * 200 = 75, 37.5, 100
    #   (0.5, 0.25, 0.75, 0.25)    -> x 0.125 * 300 = 37.5, y 0.125 * 200 = 25, 225, 50
    #   (0.875, 0.5, 0.25, 1.0)    -> x 0.75 * 300 = 225, y 0, 75, 200
    # Image 42 (W 160, H 240):
    #   (0.5, 0.5, 1.0, 1.0)       -> 0, 0, 160, 240
    #   (0.25, 0.75, 0.5, 0.125)   -> x 0, y 0.6875 * 240 = 165, 80, 30
    #   (0.625, 0.125, 0.25, 0.0625) -> x 0.5 * 160 = 80, y 0.09375 * 240 = 22.5, 40, 15
    expected = [
        {"image_id": 7, "category_id": 3, "bbox": [56.25, 75.0, 37.5, 100.0], "score": 0.5},
        {"image_id": 7, "category_id": 1, "bbox": [37.5, 25.0, 225.0, 50.0], "score": 0.5},
        {"image_id": 7, "category_id": 4, "bbox": [225.0, 0.0, 75.0, 200.0], "score": 0.1875},
        {"image_id": 42, "category_id": 0, "bbox": [0.0, 0.0, 160.0, 240.0], "score": 0.5},
        {"image_id": 42, "category_id": 2, "bbox": [0.0, 165.0, 80.0, 30.0], "score": 0.25},
        {"image_id": 42, "category_id": 4, "bbox": [80.0, 22.5, 40.0, 15.0], "score": 0.6},
    ]
    assert len(found) == len(expected)
    for got, want in zip(found, expected):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"], got
        assert isinstance(got["image_id"], int) and isinstance(got["category_id"], int)
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3), got
        assert got["score"] == pytest.approx(want["score"], abs=2e-6), got


def _target(image_id: int, box: list[float]) -> dict:
    return {"image_id": image_id, "annotations": [{"id": image_id, "image_id": image_id, "category_id": 1,
                                                   "bbox": box, "area": box[2] * box[3], "iscrowd": 0}]}


def test_label_boxes_are_relative_to_the_visible_image_whatever_the_batch():
    """The ground truth the set-prediction loss is given must be in the frame of DETR's predictions: (cx, cy, w, h)
    relative to the image's own (resized, unpadded) extent, the frame detect() maps back to pixels."""
    landscape = (Image.new("RGB", (128, 64)), _target(1, [8, 16, 48, 32]))  # 128 wide, 64 high
    portrait = (Image.new("RGB", (64, 128)), _target(2, [16, 8, 32, 96]))  # 64 wide, 128 high
    collate = DetrCollate(image_processor(InputSize(64, 128)), with_labels=True)  # both keep their size
    batch = collate([landscape, portrait])
    assert tuple(batch["pixel_values"].shape[-2:]) == (128, 128)  # both padded to a 128 x 128 canvas
    # By hand: landscape box centre (8 + 24, 16 + 16) = (32, 32) of (128, 64) -> (0.25, 0.5), size (0.375, 0.5);
    # portrait box centre (16 + 16, 8 + 48) = (32, 56) of (64, 128) -> (0.5, 0.4375), size (0.5, 0.75).
    alone = [collate([image])["labels"][0]["boxes"].tolist() for image in (landscape, portrait)]
    assert alone == [[[0.25, 0.5, 0.375, 0.5]], [[0.5, 0.4375, 0.5, 0.75]]]  # unpadded: right
    together = [labels["boxes"].tolist() for labels in batch["labels"]]
    # (the image processor alone gives [[0.25, 0.25, 0.375, 0.25]] and [[0.25, 0.4375, 0.25, 0.75]]: the canvas)
    assert together == alone


# =========================================================================================================
# MGS objectives, term by term


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


STUDENT_LOGITS = [[[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]]  # 1 image, 2 queries, 2 classes + "no object"
TEACHER_LOGITS = [[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]]
STUDENT_BOXES = [[[0.5, 0.5, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]]]
TEACHER_BOXES = [[[0.4, 0.5, 0.25, 0.2], [0.3, 0.2, 0.3, 0.1]]]


def _distillation_by_hand(box_weight: float) -> tuple[float, float]:
    """KL(teacher || student) per query, averaged; L1 of the boxes weighted by the teacher's objectness."""
    kls, weighted_l1, weights = [], 0.0, 0.0
    for s_logits, t_logits, s_box, t_box in zip(STUDENT_LOGITS[0], TEACHER_LOGITS[0], STUDENT_BOXES[0],
                                                 TEACHER_BOXES[0]):
        p, q = _softmax(s_logits), _softmax(t_logits)
        kls.append(sum(qc * (math.log(qc) - math.log(pc)) for pc, qc in zip(p, q)))
        objectness = 1.0 - q[-1]  # the teacher's belief that the query holds an object
        weighted_l1 += objectness * sum(abs(a - b) for a, b in zip(s_box, t_box))
        weights += objectness
    return sum(kls) / len(kls), box_weight * weighted_l1 / weights


def test_distillation_loss_is_kl_plus_objectness_weighted_l1():
    kl, box = _distillation_by_hand(box_weight=5.0)
    # The two parts are of similar size here, so losing either one shows.
    assert kl > 0.3 and box > 0.3
    tensors = {k: torch.tensor(v) for k, v in (("logits", STUDENT_LOGITS), ("teacher_logits", TEACHER_LOGITS),
                                                ("boxes", STUDENT_BOXES), ("teacher_boxes", TEACHER_BOXES))}
    direct = distillation_loss(tensors["logits"], tensors["boxes"], tensors["teacher_logits"],
                               tensors["teacher_boxes"], box_weight=5.0)
    assert float(direct) == pytest.approx(kl + box, rel=1e-6)
    # As the training loop asks for it; and the KL alone when the boxes agree.
    outputs = SimpleNamespace(logits=tensors["logits"], pred_boxes=tensors["boxes"])
    batch = {"teacher_logits": tensors["teacher_logits"], "teacher_boxes": tensors["teacher_boxes"]}
    via_objective = objective_loss("distillation", outputs, batch, {}, None, target=0.5, box_weight=5.0)
    assert float(via_objective) == pytest.approx(kl + box, rel=1e-6)
    same_boxes = distillation_loss(tensors["logits"], tensors["teacher_boxes"], tensors["teacher_logits"],
                                   tensors["teacher_boxes"], box_weight=5.0)
    assert float(same_boxes) == pytest.approx(kl, rel=1e-6)
    # Identical outputs: nothing to learn.
    assert float(distillation_loss(tensors["teacher_logits"], tensors["teacher_boxes"], tensors["teacher_logits"],
                                   tensors["teacher_boxes"], box_weight=5.0)) == pytest.approx(0.0, abs=1e-7)


def _weighted_bce(logit: float, positive: bool, pos_weight: float) -> float:
    """-(w y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))"""
    return -pos_weight * math.log(_sigmoid(logit)) if positive else -math.log(1.0 - _sigmoid(logit))


def _oracle_gate(d_model, hidden, group_size, logits, activations) -> MicroGate:
    gate = MicroGate(d_model, hidden, group_size)
    gate.last_logits = torch.tensor(logits, dtype=torch.float32)
    gate.last_activations = torch.tensor(activations, dtype=torch.float32)
    return gate


def test_oracle_loss_is_weighted_bce_on_the_hand_picked_top_groups():
    # Block 1: groups of 2 neurons, 4 groups; 1 image of 3 tokens, the last one padding.
    # Target 0.75 keeps round(0.25 x 4) = 1 group per token; positives weigh (4 - 1) / 1 = 3 each, so the
    # one positive and the three negatives of a token weigh the same in total.
    block_1 = _oracle_gate(3, 8, 2,
                           logits=[[[0.0, 2.0, -1.0, 0.5], [1.0, -2.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]]],
                           activations=[[[0, 1, 5, 0, 2, 2, 0, 0.5],  # group sums 1, 5, 4, 0.5: group 1
                                         [3, 3, 0, 0, 1, 0, 0, 0],  # 6, 0, 1, 0: group 0
                                         [0, 0, 0, 0, 9, 9, 0, 0]]])  # padding: not counted
    positives_1 = [1, 0]
    per_token = [sum(_weighted_bce(x, g == positives_1[t], 3.0) for g, x in enumerate(block_1.last_logits[0, t].tolist())) / 4
                 for t in range(2)]
    by_hand_1 = sum(per_token) / 2
    # Block 2: groups of 4 neurons, 2 groups; 2 images of 1 token each, all real (decoder queries).
    # keep = max(1, round(0.25 x 2)) = 1; positives weigh (2 - 1) / 1 = 1.
    block_2 = _oracle_gate(3, 8, 4, logits=[[[0.3, -0.7]], [[1.5, 0.2]]],
                           activations=[[[0, 0, 0, 1, 2, 0, 0, 0]],  # sums 1, 2: group 1
                                        [[4, 0, 0, 0, 0, 0, 1, 0]]])  # sums 4, 1: group 0
    by_hand_2 = (_weighted_bce(0.3, False, 1) + _weighted_bce(-0.7, True, 1)
                 + _weighted_bce(1.5, True, 1) + _weighted_bce(0.2, False, 1)) / 4

    real_1 = torch.tensor([[True, True, False]])
    assert float(oracle_loss(block_1, real_1, target=0.75)) == pytest.approx(by_hand_1, rel=1e-6)
    assert float(oracle_loss(block_2, None, target=0.75)) == pytest.approx(by_hand_2, rel=1e-6)
    # The objective is the mean over the gated blocks.
    sparsity = SimpleNamespace(blocks={"encoder.0": SimpleNamespace(token_mask=real_1),
                                       "decoder.0": SimpleNamespace(token_mask=None)})
    gates = {"encoder.0": block_1, "decoder.0": block_2}
    loss = objective_loss("oracle", None, None, gates, sparsity, target=0.75, box_weight=5.0)
    assert float(loss) == pytest.approx((by_hand_1 + by_hand_2) / 2, rel=1e-6)


def _corners(box):
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b) -> float:
    """Generalised IoU of two (cx, cy, w, h) boxes: IoU - (hull - union) / hull."""
    ax0, ay0, ax1, ay1 = _corners(a)
    bx0, by0, bx1, by1 = _corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


# DETR's loss weights (Carion et al. 2020): class 1, L1 5, GIoU 2, in the matching cost and in the loss;
# the "no object" class weighs 0.1 in the cross-entropy.
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT, NO_OBJECT_WEIGHT = 1.0, 5.0, 2.0, 0.1


def _set_prediction_loss_by_hand(logits, boxes, labels) -> float:
    """DETR's loss for one set of predictions (lists of floats): the cheapest one-to-one assignment of queries to
    ground-truth boxes, found by trying every one; weighted cross-entropy over all queries (unmatched ones
    labelled "no object"), and L1 and 1 - GIoU over matched boxes, each divided by the number of boxes."""
    no_object = len(logits[0][0]) - 1
    num_boxes = sum(len(t["classes"]) for t in labels)
    ce_sum, ce_weights, l1_sum, giou_sum = 0.0, 0.0, 0.0, 0.0
    for image_logits, image_boxes, target in zip(logits, boxes, labels):
        probs = [_softmax(row) for row in image_logits]
        pairs = list(zip(target["classes"], target["boxes"]))

        def cost(query, pair):
            cls, box = pair
            l1 = sum(abs(p - t) for p, t in zip(image_boxes[query], box))
            return -CLASS_WEIGHT * probs[query][cls] + L1_WEIGHT * l1 - GIOU_WEIGHT * _giou(image_boxes[query], box)

        best = min(itertools.permutations(range(len(image_logits)), len(pairs)),
                   key=lambda queries: sum(cost(q, pair) for q, pair in zip(queries, pairs)))
        matched = dict(zip(best, pairs))
        for query, row in enumerate(probs):
            cls = matched[query][0] if query in matched else no_object
            weight = 1.0 if query in matched else NO_OBJECT_WEIGHT
            ce_sum += -weight * math.log(row[cls])
            ce_weights += weight
        for query, (_cls, box) in matched.items():
            l1_sum += sum(abs(p - t) for p, t in zip(image_boxes[query], box))
            giou_sum += 1.0 - _giou(image_boxes[query], box)
    return ce_sum / ce_weights + L1_WEIGHT * l1_sum / num_boxes + GIOU_WEIGHT * giou_sum / num_boxes


def test_task_loss_is_detrs_set_prediction_loss_by_hand(model):
    batch = pixel_batches(n_batches=1, images=2, padded=True)[0]
    labels = [{"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2]])},
              {"class_labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]])}]
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels)
    targets = [{"classes": lab["class_labels"].tolist(), "boxes": lab["boxes"].tolist()} for lab in labels]
    # The last decoder layer's predictions, and (auxiliary loss, as DETR) the earlier decoder layer's, each
    # matched on its own.
    assert len(outputs.auxiliary_outputs) == ARCH["decoder_layers"] - 1
    by_hand = _set_prediction_loss_by_hand(outputs.logits.tolist(), outputs.pred_boxes.tolist(), targets)
    for aux in outputs.auxiliary_outputs:
        by_hand += _set_prediction_loss_by_hand(aux["logits"].tolist(), aux["pred_boxes"].tolist(), targets)
    loss = objective_loss("task", outputs, {"labels": labels}, {}, None, target=0.5, box_weight=5.0)
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)


def test_training_loss_is_the_objective_plus_the_multiplier_times_the_open_excess(model):
    """loss = objective + lambda (open - budget), lambda updated by dual ascent on the hard open fraction, the
    budget falling linearly from 1 to 1 - target over the warm-up: recounted at every step from the gate
    logits that step computed (all tokens real: no padding in these batches)."""
    cache = build_front_end_cache(model, pixel_batches(padded=False))
    gates = {name: MicroGate(D, H, G) for name in ffn_blocks(model)}
    settings = GateTraining(target=0.75, objective="distillation", steps=8, batch_size=4, learning_rate=0.05,
                            multiplier_rate=0.5, target_warmup=0.5, checkpoint_every=100)
    seen = []

    def log_step(step, metrics):
        logits = torch.cat([gate.last_logits.detach().flatten() for gate in gates.values()])
        seen.append((step, dict(metrics), float(torch.sigmoid(logits.double()).mean()), float((logits > 0).double().mean())))

    train_gates(model, gates, cache, settings, seed=0, log_step=log_step)
    assert [step for step, *_ in seen] == list(range(1, 9))
    multiplier, sparsity_terms = 0.0, []
    for step, metrics, soft, hard in seen:
        budget = 1.0 - 0.75 * min(1.0, (step - 1) / (0.5 * 8))  # 1, 0.8125, 0.625, 0.4375, 0.25, 0.25, ...
        assert metrics["budget"] == pytest.approx(budget, abs=1e-12)
        assert metrics["induced_sparsity"] == pytest.approx(1.0 - hard, abs=1e-12)
        term = multiplier * (soft - budget)  # with the multiplier of the step before
        assert metrics["loss"] - metrics["objective_loss"] == pytest.approx(term, abs=1e-5), step
        sparsity_terms.append(term)
        multiplier = max(0.0, multiplier + 0.5 * (hard - budget))
        assert metrics["multiplier"] == pytest.approx(multiplier, abs=1e-12), step
    assert max(abs(t) for t in sparsity_terms) > 1e-2  # the term was really there to be checked


# =========================================================================================================
# Calibration


# Gates that ignore their input (zero weights) and whose 16 group biases are -3, -2.5, ..., 4.5, shuffled: after
# an offset o on every logit, group j is closed for every token when b_j - o <= 0, so the induced sparsity is
# #{b_j <= o} / 16, the same in every block and for every token. The target 0.75 closes 12 groups: o in
# [2.5, 3.0); the target 0.25 closes 4: o in [-1.5, -1.0). Unshifted (o = 0) 7 of 16 are closed (0.4375), so
# the two targets lie on either side of the start.
BIASES = [-3.0 + 0.5 * j for j in (5, 12, 0, 9, 15, 3, 7, 10, 1, 14, 6, 11, 2, 8, 13, 4)]


# Shifted by 40 logits: every group open by a wide margin, as gates trained on labels that are nearly all 1 are;
# the offset must be found however far it lies.
@pytest.mark.parametrize("target, offset_range, shift", [(0.75, (2.5, 3.0), 0.0), (0.25, (-1.5, -1.0), 0.0),
                                                         (0.75, (42.5, 43.0), 40.0)])
def test_calibration_finds_the_known_offset_and_reaches_the_target(model, target, offset_range, shift):
    data = pixel_batches(padded=True)
    cache = build_front_end_cache(model, data)
    gates = {}
    for name in ffn_blocks(model):
        gate = MicroGate(D, H, G)
        with torch.no_grad():
            gate.gate.bias.copy_(torch.tensor(BIASES) + shift)
        gates[name] = gate
    result = calibrate_gates(model, gates, cache, list(range(len(cache))), target=target, batch_size=4)
    # calibrate_gates promises the target within its tolerance (1e-3 by default); here it is reachable exactly.
    assert abs(result["sparsity_after"] - target) <= 1e-3
    assert result["sparsity_after"] == target and result["sparsity_before"] == (7 / 16 if shift == 0 else 0.0)
    low, high = offset_range
    assert low <= result["offset"] < high
    closed = round(target * 16)
    for gate in gates.values():  # the offset is folded into the biases; the threshold stays at 0.5
        assert torch.allclose(gate.gate.bias, torch.tensor(BIASES) + shift - result["offset"])
        assert int((gate.gate.bias <= 0).sum()) == closed and gate.threshold == 0.5
    # Recounted from pixels, with the calibrated gates on the real model.
    with sparse_ffns(model, gates) as sparsity, torch.no_grad():
        for batch in data:
            model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    assert sparsity.induced_sparsity()["overall"] == pytest.approx(target, abs=1e-12)
