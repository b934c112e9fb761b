"""Denoising queries for pretraining (DN-DETR, Li et al. 2022): noised copies of each image's boxes and labels fed to
the decoder beside its object queries, each trained to reconstruct the box and label it was made from.

A denoising query's target is known, so its loss needs no bipartite matching: it gives the decoder a stable
training signal while the Hungarian matching of the object queries is still unstable, which is what slows DETR's
early training. Each of `groups` groups holds one noised copy of every box of the image; the self-attention mask
keeps the object queries from seeing any denoising query (at inference there are none) and each group from
seeing the others (a group would otherwise copy the answer from another's less noisy copy).

`DetrForObjectDetection` takes no extra queries and no query-by-query mask, so `DenoisingQueries.loss` runs the
model's own modules itself (as `DetrModel.forward` chains them) with the denoising queries prepended. The module
is a training aid only: the model saved after pretraining is the standard `DetrForObjectDetection`, untouched by it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import DetrForObjectDetection
from transformers.loss.loss_for_object_detection import ImageLoss


def repeat_targets(labels: list[dict], copies: int) -> list[dict]:
    """Each image's targets `copies` times over, one copy after another."""
    if copies == 1:
        return labels
    return [{k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in lab.items()} for lab in labels]


def sine_box_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(…, 4) boxes (centre x, centre y, width, height in [0, 1]) as (…, dim) sines and cosines, dim / 4 per
    coordinate, at DETR's positional-encoding frequencies."""
    per_coordinate = dim // 4
    frequencies = temperature ** (2 * (torch.arange(per_coordinate, device=boxes.device) // 2) / per_coordinate)
    angles = boxes[..., None] * (2 * math.pi) / frequencies  # (…, 4, per_coordinate)
    embedding = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
    return embedding.flatten(-2)


class DenoisingQueries(nn.Module):
    """The denoising queries of one training step, made from the batch's ground truth, and the loss of the model run
    with them. Its own parameters (a label embedding for the queries' content, an MLP from a box's sine embedding
    to the queries' position embedding) train with the model and are discarded with this module."""

    def __init__(self, model: DetrForObjectDetection, groups: int, box_noise: float, label_noise: float) -> None:
        super().__init__()
        config = model.config
        if config.d_model % 8:
            raise ValueError(f"denoising queries need d_model divisible by 8 (the box's sine embedding), "
                             f"got {config.d_model}")
        self.groups, self.box_noise, self.label_noise = groups, box_noise, label_noise
        self.num_labels, self.eos_coefficient = config.num_labels, config.eos_coefficient
        # The last index is a padding slot's content: a group is as long as the batch's most crowded image.
        self.label_embedding = nn.Embedding(config.num_labels + 1, config.d_model)
        self.box_position = nn.Sequential(nn.Linear(config.d_model, config.d_model), nn.ReLU(),
                                          nn.Linear(config.d_model, config.d_model))

    def noised(self, labels: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, boxes, valid) of the denoising slots, (batch, groups x K, …) with K the batch's most boxes
        per image: slot g K + j of an image is group g's copy of its box j (valid where j < its box count).

        Label noise: each label replaced by a uniformly drawn class with probability `label_noise`. Box noise (as
        DN-DETR's): the centre moved by up to `box_noise` x half the width (height), the width (height) scaled
        by a factor within 1 ± `box_noise`; boxes clipped to the image."""
        batch = len(labels)
        device = labels[0]["boxes"].device
        counts = torch.tensor([len(lab["class_labels"]) for lab in labels])
        classes = pad_sequence([lab["class_labels"].cpu() for lab in labels], batch_first=True,
                               padding_value=self.num_labels).repeat(1, self.groups)
        boxes = pad_sequence([lab["boxes"].cpu() for lab in labels], batch_first=True).repeat(1, self.groups, 1)
        most = classes.shape[1] // self.groups
        valid = (torch.arange(most)[None, :] < counts[:, None]).repeat(1, self.groups)
        slots = classes.shape[1]
        flip = torch.rand(classes.shape, generator=generator) < self.label_noise
        random_classes = torch.randint(0, self.num_labels, classes.shape, generator=generator)
        classes = torch.where(flip & valid, random_classes, classes)
        shift, scale = (torch.rand(batch, slots, 2, generator=generator) * 2 - 1 for _ in range(2))
        centre = boxes[..., :2] + shift * self.box_noise * boxes[..., 2:] / 2
        size = boxes[..., 2:] * (1 + scale * self.box_noise)
        corners = torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0, 1)
        boxes = torch.cat([(corners[..., :2] + corners[..., 2:]) / 2, corners[..., 2:] - corners[..., :2]], -1)
        return classes.to(device), boxes.to(device), valid.to(device)

    def attention_mask(self, slots: int, queries: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The decoder self-attention's additive mask, (1, 1, slots + queries, slots + queries): object queries see
        only object queries; each denoising group sees itself and the object queries."""
        total, per_group = slots + queries, slots // self.groups
        group = torch.arange(total, device=device) // per_group
        is_object = torch.arange(total, device=device) >= slots
        allowed = (group[:, None] == group[None, :]) & ~is_object[:, None] | is_object[None, :]
        mask = torch.zeros(total, total, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def loss(self, model: DetrForObjectDetection, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
             labels: list[dict], match_labels: list[dict], generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(DETR's loss of the object queries against `match_labels`, with Hungarian matching, as
        `model(..., labels=match_labels).loss` computes it; the same weighted sum of loss terms of the denoising
        queries against the boxes of `labels` they were made from, 0 where no image of the batch has a box; every
        term, those of the denoising queries prefixed "dn_")."""
        config, detr = model.config, model.model
        # DetrModel.forward's chain: backbone, projection, sine positions, encoder.
        feature_map, mask = detr.backbone(pixel_values, pixel_mask)[-1]
        features = detr.input_projection(feature_map).flatten(2).transpose(1, 2)
        spatial = detr.position_embedding(shape=feature_map.shape, device=pixel_values.device,
                                          dtype=pixel_values.dtype, mask=mask).flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = detr.encoder(inputs_embeds=features, attention_mask=mask,
                              spatial_position_embeddings=spatial).last_hidden_state

        batch, queries = pixel_values.shape[0], config.num_queries
        classes, boxes, _valid = self.noised(labels, generator)  # padding slots learn "no object": no mask needed
        # A batch in which no image has a box has no denoising slot: the decoder then runs the object queries alone,
        # as DetrModel does, and the denoising loss is 0.
        slots = classes.shape[1]
        object_positions = detr.query_position_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
        content = torch.cat([self.label_embedding(classes), torch.zeros_like(object_positions)], 1)
        positions = torch.cat([self.box_position(sine_box_embedding(boxes, config.d_model)), object_positions], 1)
        groups_mask = self.attention_mask(slots, queries, content.dtype, content.device) if slots else None
        decoded = detr.decoder(inputs_embeds=content, attention_mask=groups_mask,
                               spatial_position_embeddings=spatial, object_queries_position_embeddings=positions,
                               encoder_hidden_states=memory, encoder_attention_mask=mask)
        # As DetrForObjectDetection: the final prediction from the decoder's output, the auxiliary ones from the
        # earlier layers' (their loss terms are suffixed _0, _1, ...).
        layers = torch.cat([decoded.intermediate_hidden_states[:-1], decoded.last_hidden_state[None]])
        logits, pred_boxes = model.class_labels_classifier(layers), model.bbox_predictor(layers).sigmoid()

        matched, terms, _ = model.loss_function(logits[-1, :, slots:], match_labels, pixel_values.device,
                                                pred_boxes[-1, :, slots:], config, logits[:, :, slots:],
                                                pred_boxes[:, :, slots:])
        if not slots:
            return matched, matched.new_zeros(()), terms
        dn_terms = self._denoising_terms(logits[:, :, :slots], pred_boxes[:, :, :slots], labels)
        # DETR's weights, the auxiliary layers' terms ("loss_bbox_0", ...) as the last layer's.
        weights = {"loss_ce": 1.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
        denoised = sum(value * weights[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
                       for key, value in dn_terms.items())
        terms.update({f"dn_{key}": value for key, value in dn_terms.items()})
        return matched, denoised, terms

    def _denoising_terms(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]
                         ) -> dict[str, torch.Tensor]:
        """DETR's class and box loss terms of the denoising slots (every decoder layer), each slot assigned the box
        it was made from: no matching. Padding slots are trained towards "no object", as unmatched queries are."""
        most = logits.shape[2] // self.groups  # K: (layers, batch, groups x K, classes)
        assignment = []
        for lab in labels:
            n = len(lab["class_labels"])
            source = (torch.arange(self.groups)[:, None] * most + torch.arange(n)[None, :]).flatten()
            target = (torch.arange(self.groups)[:, None] * n + torch.arange(n)[None, :]).flatten()
            assignment.append((source, target))
        criterion = ImageLoss(matcher=lambda outputs, targets: assignment, num_classes=self.num_labels,
                              eos_coef=self.eos_coefficient, losses=["labels", "boxes"]).to(logits.device)
        # The earlier layers' predictions as ImageLoss takes them (DetrForObjectDetection's auxiliary outputs).
        outputs = {"logits": logits[-1], "pred_boxes": pred_boxes[-1],
                   "auxiliary_outputs": [{"logits": layer_logits, "pred_boxes": layer_boxes}
                                         for layer_logits, layer_boxes in zip(logits[:-1], pred_boxes[:-1])]}
        return criterion(outputs, repeat_targets(labels, self.groups))
