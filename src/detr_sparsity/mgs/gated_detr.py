"""A gated DETR to take away: a dense DETR with a saved MGS gate set built into its FFN blocks.

    from detr_sparsity.mgs import load_gated_detr
    model = load_gated_detr("results/synthetic/model", "results/synthetic/mgs/distillation/0.9/gates.safetensors")

The result is an ordinary `DetrForObjectDetection` (eval mode) whose gated FFN blocks compute
fc2(m * relu(fc1 x)) with m the gate's hard mask, so `DetrImageProcessor.post_process_object_detection`
and everything else that takes a DETR works unchanged. It computes exactly what the study evaluated (same
operations as the evaluation's wrapper, without its counters). This module masks; it does not yet skip the
masked rows and columns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.mgs.gates import MicroGate, load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_layers


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


def add_gates(model: DetrForObjectDetection, gates: dict[str, MicroGate]) -> DetrForObjectDetection:
    """Build `gates` into `model` in place (blocks without a gate stay dense); returns the model."""
    layers = ffn_layers(model)
    unknown = sorted(set(gates) - set(layers))
    if unknown:
        raise ValueError(f"the gate set names {', '.join(unknown)}, not FFN blocks of this model "
                         f"({', '.join(layers)}); was it trained for another DETR?")
    gated = [name for name in gates if isinstance(layers[name].mlp, GatedFFN)]
    if gated:  # checked before any change, so a refused call leaves the model as it was
        raise RuntimeError(f"FFN block {gated[0]} already has a gate")
    for name, gate in gates.items():
        layers[name].mlp = GatedFFN(layers[name].mlp, gate)
    return model


def load_gated_detr(model: str | Path | DetrForObjectDetection, gates: str | Path,
                    revision: str | None = None) -> DetrForObjectDetection:
    """A DETR (hub id, local directory or loaded model) with the gate set saved at `gates` built in, in eval mode."""
    if not isinstance(model, DetrForObjectDetection):
        model = load_detr(model, revision)
    return add_gates(model, load_gates(gates)).eval()
