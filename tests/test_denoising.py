"""Denoising queries in pretraining: the object queries' loss is the model's own with or without them beside it, the
attention mask is the one DN-DETR prescribes, each denoising slot holds a noised copy of the box it is scored
against, and perfect predictions of those boxes cost nothing."""

from __future__ import annotations

import pytest
import torch

from detr_sparsity.models.denoising import DenoisingQueries, sine_box_embedding
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config

ARCH = {"d_model": 32, "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16], "backbone_depths": [1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]
LABELS = [{"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
          {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_small_detr(small_detr_config(ARCH, CATEGORIES)).eval()


def _pixels():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=generator), torch.ones(2, 64, 64, dtype=torch.long)


@pytest.mark.parametrize("groups", [1, 3])
def test_object_queries_loss_is_detrs_own_with_denoising_queries_beside_them(model, groups):
    """The object queries see no denoising query, so their loss terms are those of `model(..., labels=)` (which
    runs without any), and the denoising queries add a loss of their own."""
    pixel_values, pixel_mask = _pixels()
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=LABELS)
        denoising = DenoisingQueries(model, groups=groups, box_noise=0.4, label_noise=0.2)
        matched, denoised, terms = denoising.loss(model, pixel_values, pixel_mask, LABELS, LABELS,
                                                  torch.Generator().manual_seed(0))
    torch.testing.assert_close(matched, reference.loss, rtol=1e-5, atol=1e-6)
    for key, value in reference.loss_dict.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=1e-6)
    assert {k for k in terms if k.startswith("dn_")} == {"dn_loss_ce", "dn_loss_bbox", "dn_loss_giou",
                                                         "dn_loss_ce_0", "dn_loss_bbox_0", "dn_loss_giou_0"}
    assert denoised > 0


NO_BOX = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}


@pytest.mark.parametrize("labels", [[NO_BOX, LABELS[1]], [NO_BOX, NO_BOX]], ids=["one image without", "no box"])
def test_images_without_boxes_train_as_detr_would(model, labels):
    """COCO holds images without annotations. An image without boxes has only padding slots; a batch in which no
    image has a box has no denoising slot at all: its object queries' loss is still `model(..., labels=)`'s and its
    denoising loss is 0."""
    pixel_values, pixel_mask = _pixels()
    denoising = DenoisingQueries(model, groups=2, box_noise=0.4, label_noise=0.2)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        matched, denoised, terms = denoising.loss(model, pixel_values, pixel_mask, labels, labels,
                                                  torch.Generator().manual_seed(0))
    torch.testing.assert_close(matched, reference.loss, rtol=1e-5, atol=1e-6)
    has_boxes = any(len(lab["boxes"]) for lab in labels)
    assert torch.isfinite(denoised) and (denoised > 0) == has_boxes
    assert any(key.startswith("dn_") for key in terms) == has_boxes


def test_attention_mask_separates_groups_and_hides_them_from_object_queries(model):
    """2 groups of 2 slots, then 2 object queries: row = the query attending, column = the key (DN-DETR's mask)."""
    mask = DenoisingQueries(model, groups=2, box_noise=0.4, label_noise=0.2).attention_mask(4, 2, torch.float32, "cpu")
    allowed = torch.tensor([[1, 1, 0, 0, 1, 1],
                            [1, 1, 0, 0, 1, 1],
                            [0, 0, 1, 1, 1, 1],
                            [0, 0, 1, 1, 1, 1],
                            [0, 0, 0, 0, 1, 1],
                            [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert torch.all(mask[0, 0][~allowed] == torch.finfo(torch.float32).min)


def test_noised_slots_are_copies_of_each_box_within_the_noise_bounds(model):
    """Without noise, slot g K + j is box j of its image, padding slots (past an image's boxes) carry the padding
    label; with box noise 0.4 every centre moves by at most 0.4 x half the size and every size scales by a factor
    within [0.6, 1.4] (boxes here are far enough from the border not to be clipped); label noise 0.5 redraws about
    half the labels."""
    groups, most = 3, 2
    quiet = DenoisingQueries(model, groups=groups, box_noise=0.0, label_noise=0.0)
    classes, boxes, valid = quiet.noised(LABELS, torch.Generator().manual_seed(0))
    assert classes.shape == (2, groups * most) and boxes.shape == (2, groups * most, 4)
    assert valid.tolist() == [[True, True] * groups, [True, False] * groups]
    padding = model.config.num_labels
    assert classes.tolist() == [[1, 3] * groups, [2, padding] * groups]
    for g in range(groups):
        torch.testing.assert_close(boxes[0, g * most:(g + 1) * most], LABELS[0]["boxes"])
        torch.testing.assert_close(boxes[1, g * most], LABELS[1]["boxes"][0])

    noisy = DenoisingQueries(model, groups=50, box_noise=0.4, label_noise=0.5)
    classes, boxes, valid = noisy.noised(LABELS, torch.Generator().manual_seed(0))
    # Image 1's padding slot gets a stand-in box: it is not compared (not valid).
    truth = torch.stack([LABELS[0]["boxes"], LABELS[1]["boxes"].repeat(2, 1)]).repeat(1, 50, 1)
    true_classes = torch.tensor([[1, 3], [2, padding]]).repeat(1, 50)
    shift = (boxes[..., :2] - truth[..., :2]).abs()[valid]
    scale = (boxes[..., 2:] / truth[..., 2:])[valid]
    assert torch.all(shift <= 0.4 * truth[..., 2:][valid] / 2 + 1e-6) and shift.max() > 0.01
    assert torch.all((scale >= 0.6 - 1e-6) & (scale <= 1.4 + 1e-6)) and (scale - 1).abs().max() > 0.05
    assert torch.equal(classes[~valid], true_classes[~valid])  # padding is never relabelled
    changed = (classes != true_classes)[valid].float().mean().item()
    # Half are redrawn, uniformly over the model's 5 labels (ids 0-4, the true one among them): 2/5 change.
    assert 0.28 < changed < 0.52, changed


def test_perfect_predictions_of_the_copied_boxes_cost_nothing(model):
    """Scores and boxes that name, in each slot, the box it was made from (and no object in padding slots) leave no
    class or box loss: each slot is scored against its own box, with no matching."""
    groups, most, layers = 2, 2, model.config.decoder_layers
    denoising = DenoisingQueries(model, groups=groups, box_noise=0.4, label_noise=0.2)
    classes = torch.tensor([[1, 3], [2, model.config.num_labels]]).repeat(1, groups)
    boxes = torch.stack([LABELS[0]["boxes"], torch.cat([LABELS[1]["boxes"], torch.full((1, 4), 0.5)])])
    logits = torch.nn.functional.one_hot(classes, model.config.num_labels + 1).float() * 100
    pred_boxes = boxes.repeat(1, groups, 1)
    terms = denoising._denoising_terms(logits.expand(layers, -1, -1, -1), pred_boxes.expand(layers, -1, -1, -1),
                                       LABELS)
    for key, value in terms.items():
        assert value.item() == pytest.approx(0, abs=1e-6), key
    # The same predictions with the groups' boxes swapped between the two objects of image 0 are wrong.
    swapped = pred_boxes.clone()
    swapped[0] = swapped[0, [1, 0, 3, 2]]
    terms = denoising._denoising_terms(logits[None], swapped[None], LABELS)
    assert terms["loss_bbox"] > 0.1 and terms["loss_giou"] > 0.1


def test_sine_box_embedding_encodes_each_coordinate_at_detrs_frequencies():
    """dim 8: two values per coordinate, sin(2 pi c) and cos(2 pi c) (the first frequency pair is 1)."""
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    expected = torch.stack([torch.sin(2 * torch.pi * box[0]), torch.cos(2 * torch.pi * box[0])], -1).flatten()
    torch.testing.assert_close(sine_box_embedding(box, 8)[0], expected)
