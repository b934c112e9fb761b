"""A gated DETR to take away: a dense DETR with a saved MGS gate set built into its FFN blocks.

    from detr_sparsity.execution.gated_detr import load_gated_detr
    model = load_gated_detr("results/synthetic/model", "results/synthetic/mgs/distillation/0.9/gates.safetensors",
                            execution="sparse")

The result is an ordinary `DetrForObjectDetection` (eval mode), so `DetrImageProcessor.post_process_object_detection`
and everything else that takes a DETR works unchanged. Its gated FFN blocks execute one of two ways:
- `masked` (the default): what the study evaluated, fc2(m * relu(fc1 x)) with m the gate's hard group mask,
  dense fc1 and fc2 (the same operations as the evaluation's wrapper, without its counters);
- `sparse`: only the groups the gate opens are computed, per token (inference only; `gated_ffn`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.execution.gated_ffn import PackedFFN, check_execution, sparse_ffn
from detr_sparsity.mgs.gates import MicroGate, load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks, replace_ffns


class GatedFFN(nn.Module):
    """A DETR FFN block (DetrMLP) with its MGS gate: fc2(m * relu(fc1 x)), m = gate's hard group mask."""

    def __init__(self, block: nn.Module, gate: MicroGate) -> None:
        super().__init__()
        if (gate.gate.in_features, gate.groups * gate.group_size) != (block.fc1.in_features, block.fc1.out_features):
            raise ValueError(f"a gate for d = {gate.gate.in_features}, H = {gate.groups * gate.group_size} does not "
                             f"fit an FFN block with d = {block.fc1.in_features}, H = {block.fc1.out_features}")
        self.block, self.gate = block, gate.eval()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        block = self.block
        activations = block.activation_fn(block.fc1(hidden_states))
        masked = activations * self.gate.mask(hidden_states, activations)
        masked = nn.functional.dropout(masked, p=block.activation_dropout, training=self.training)
        return nn.functional.dropout(block.fc2(masked), p=block.dropout, training=self.training)


class SparseGatedFFN(nn.Module):
    """A gated FFN block that computes only the groups its gate opens, per token (inference only)."""

    def __init__(self, block: nn.Module, gate: MicroGate) -> None:
        super().__init__()
        if not isinstance(block.activation_fn, nn.ReLU):
            raise ValueError(f"sparse execution needs a ReLU FFN, not {type(block.activation_fn).__name__}")
        self.block, self.gate = block, gate.eval()
        self.packed = PackedFFN(block.fc1, block.fc2, gate.group_size)
        self.train(block.training)  # a new module starts in training mode; take the block's

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("sparse execution is for inference; call model.eval(), or use execution='masked'")
        with torch.no_grad():
            open_groups = self.gate.open_groups(self.gate(hidden_states))
            return sparse_ffn(hidden_states, open_groups, self.packed)


GATED = {"masked": GatedFFN, "sparse": SparseGatedFFN}


def add_gates(model: DetrForObjectDetection, gates: dict[str, MicroGate], execution: str = "masked"
              ) -> DetrForObjectDetection:
    """Build `gates` into `model` in place (blocks without a gate stay dense); returns the model."""
    check_execution(execution)
    blocks = ffn_blocks(model)
    unknown = sorted(set(gates) - set(blocks))
    if unknown:
        raise ValueError(f"the gate set names {', '.join(unknown)}, not FFN blocks of this model "
                         f"({', '.join(blocks)}); was it trained for another DETR?")

    def gated(name: str, block: nn.Module) -> nn.Module | None:
        if name not in gates:
            return None
        if isinstance(block, tuple(GATED.values())):
            raise RuntimeError(f"FFN block {name} already has a gate")
        return GATED[execution](block, gates[name])

    replace_ffns(model, gated)
    return model


def set_execution(model: DetrForObjectDetection, execution: str) -> DetrForObjectDetection:
    """Switch every gated FFN block of `model` to `execution` ('masked' or 'sparse') in place; returns it."""
    wanted = GATED[check_execution(execution)]
    replace_ffns(model, lambda _name, block: wanted(block.block, block.gate)
                 if isinstance(block, tuple(GATED.values())) and not isinstance(block, wanted) else None)
    return model


def load_gated_detr(model: str | Path | DetrForObjectDetection, gates: str | Path, revision: str | None = None,
                    execution: str = "masked") -> DetrForObjectDetection:
    """A DETR (hub id, local directory or loaded model) with the gate set saved at `gates` built in, in eval mode,
    executing its gated FFN blocks as `execution`."""
    check_execution(execution)
    if not isinstance(model, DetrForObjectDetection):
        model = load_detr(model, revision)
    return add_gates(model.eval(), load_gates(gates), execution).eval()
