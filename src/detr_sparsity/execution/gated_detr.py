"""The take-away gated DETR with a choice of execution: `masked` (what the study evaluated: dense fc1/fc2, the
gate's mask multiplied in) or `sparse` (the closed groups are not computed).

    from detr_sparsity.execution import load_gated_detr
    model = load_gated_detr("results/synthetic/model", "results/synthetic/mgs/distillation/0.9/gates.safetensors",
                            execution="sparse")

It lives here rather than in `detr_sparsity.mgs` so that the study's gate training and evaluation stages,
which hash that package, are not rerun by it; `detr_sparsity.mgs.load_gated_detr` is the masked model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.execution.gated_ffn import PackedFFN, check_execution, sparse_ffn
from detr_sparsity.mgs.gated_detr import GatedFFN
from detr_sparsity.mgs.gated_detr import load_gated_detr as load_masked_gated_detr
from detr_sparsity.mgs.gates import MicroGate
from detr_sparsity.sparsity.ffn import ffn_layers


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


def set_execution(model: DetrForObjectDetection, execution: str) -> DetrForObjectDetection:
    """Switch every gated FFN block of `model` to `execution` ('masked' or 'sparse') in place; returns it."""
    check_execution(execution)
    wanted = GatedFFN if execution == "masked" else SparseGatedFFN
    for layer in ffn_layers(model).values():
        if isinstance(layer.mlp, (GatedFFN, SparseGatedFFN)) and not isinstance(layer.mlp, wanted):
            layer.mlp = wanted(layer.mlp.block, layer.mlp.gate)
    return model


def load_gated_detr(model: str | Path | DetrForObjectDetection, gates: str | Path, revision: str | None = None,
                    execution: str = "sparse") -> DetrForObjectDetection:
    """A DETR with the gate set saved at `gates` built in, in eval mode, executing its FFNs as `execution`."""
    check_execution(execution)
    return set_execution(load_masked_gated_detr(model, gates, revision), execution).eval()
