"""What the gates learn from. Listed in `mgs.objectives`.

- `group_activity` (the paper's, `LAYER_LOCAL`): weighted BCE on each group's natural activity, trained once
  per study from the cached dense block inputs (`group_activity`, stage `mgs_local`) and calibrated per target.

The end-to-end objectives (`OBJECTIVES`) train through the frozen DETR, beside the sparsity term (see `training`),
once per study toward `mgs.train_target` (stage `mgs_train`), and are calibrated per target:
- `task`: DETR's set-prediction loss on the ground truth (Hungarian matching, DETR's loss weights): the
  gates close what the detections can do without.
- `distillation`: match the dense model's own outputs on the same images: KL divergence of each query's
  class distribution, plus the L1 distance of its box weighted by the dense model's object probability
  (DETR's box-to-class weight). AP retention is a comparison with the dense model, and this asks for it
  directly, without labels or matching.
- `oracle`: predict the oracle-active groups, as Deja Vu trains its predictors: per token, the groups with
  the largest summed activation of the dense block, as many as the target keeps, are positives; weighted
  binary cross-entropy (positives and negatives weigh the same in total).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.sparsity.ffn import FFNSparsity

OBJECTIVES = ("task", "distillation", "oracle")
LAYER_LOCAL = "group_activity"


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"objective = {name!r} is not allowed: allowed values: {', '.join(OBJECTIVES)}")
    return name


def needs_labels(objective: str) -> bool:
    return objective == "task"


def objective_loss(objective: str, outputs, batch: dict, gates: Mapping[str, MicroGate], sparsity: FFNSparsity,
                   target: float, box_weight: float) -> torch.Tensor:
    """The objective's term of the loss for one step (the model ran on `batch` with `gates` installed)."""
    if objective == "task":
        return outputs.loss
    if objective == "distillation":
        return distillation_loss(outputs.logits, outputs.pred_boxes, batch["teacher_logits"],
                                 batch["teacher_boxes"], box_weight)
    return sum(oracle_loss(gate, sparsity.blocks[name].token_mask, target) for name, gate in gates.items()) / len(gates)


def distillation_loss(logits: torch.Tensor, boxes: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_boxes: torch.Tensor, box_weight: float) -> torch.Tensor:
    log_p, log_q = F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    # The last class is DETR's "no object"; a box matters as much as the dense model believes in it.
    objectness = 1.0 - log_q[..., -1].exp()
    l1 = (objectness * (boxes - teacher_boxes).abs().sum(-1)).sum() / objectness.sum().clamp(min=1e-6)
    return kl + box_weight * l1


def oracle_groups(activations: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """Per token, the `keep` groups of G neurons with the largest summed (post-ReLU) activation."""
    scores = activations.unflatten(-1, (-1, group_size)).sum(-1)
    top = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores).scatter_(-1, top, 1.0)


def oracle_loss(gate: MicroGate, token_mask: torch.Tensor | None, target: float) -> torch.Tensor:
    logits, activations = gate.last_logits, gate.last_activations
    if activations is None:
        raise RuntimeError("the oracle objective needs the dense activations: set gate.keep_activations")
    keep = max(1, round((1.0 - target) * gate.groups))
    positives = oracle_groups(activations, gate.group_size, keep)
    pos_weight = torch.tensor((gate.groups - keep) / keep, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, positives, pos_weight=pos_weight, reduction="none").mean(-1)
    if token_mask is None:
        return loss.mean()
    real = token_mask.to(loss.dtype)
    return (loss * real).sum() / real.sum().clamp(min=1.0)
