"""MGS (micro-gated sparsification): a small gate per FFN block that predicts, from the block's own input,
which groups of G hidden neurons each token needs.

p = sigmoid(W_g x + b_g), W_g of shape (H/G) x d. At inference the hard mask 1[p > threshold] opens whole
groups of G neurons. In training the forward pass applies the same hard mask and the backward pass takes the
gradient of p (straight-through estimator), so the gates learn on exactly the mask they will apply.

A gate set is saved as safetensors: `<block>.weight`, `<block>.bias` per gated block, and its settings in
the metadata, so that it can be put back on the dense model it was trained for (`load_gates`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from detr_sparsity.atomic import atomic_path
from detr_sparsity.sparsity.policies import Policy

GATES_FORMAT = "detr-sparsity-mgs-gates/1"


class MicroGate(nn.Module, Policy):
    """The gate of one FFN block, as a policy of the FFN wrapper."""

    name = "mgs"
    reads_activations = False  # the mask comes from the block's input, so skipped rows of fc1 are saved too

    def __init__(self, d_model: int, hidden: int, group_size: int, threshold: float = 0.5) -> None:
        nn.Module.__init__(self)
        if group_size < 1 or hidden % group_size:
            raise ValueError(f"group_size = {group_size} is not allowed: must divide the FFN width {hidden}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"gate_threshold = {threshold} is not allowed: must be in (0, 1)")
        self.group_size, self.threshold = group_size, threshold
        self.gate = nn.Linear(d_model, hidden // group_size)
        # Start with every group open (p = 0.88): training starts from the dense model and closes groups.
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 2.0)
        # What the last training forward pass saw, for the sparsity term and the objectives.
        self.last_logits: torch.Tensor | None = None
        self.last_activations: torch.Tensor | None = None
        self.keep_activations = False  # the oracle objective needs the dense activations of each step

    @property
    def groups(self) -> int:
        return self.gate.out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The gate logits W_g x + b_g, one per group."""
        return self.gate(inputs)

    def mask(self, inputs: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        logits = self(inputs)
        open_groups = self.open_groups(logits)
        if self.training:
            self.last_logits = logits
            self.last_activations = activations.detach() if self.keep_activations else None
            p = torch.sigmoid(logits)
            # Straight-through: the forward value is exactly the hard mask (p - p.detach() is exactly 0).
            groups = open_groups.to(p.dtype) + (p - p.detach())
        else:
            groups = open_groups
        return groups.repeat_interleave(self.group_size, dim=-1)

    def open_groups(self, logits: torch.Tensor) -> torch.Tensor:
        """The hard decision p > threshold, taken on the logits (no sigmoid needed)."""
        return logits > _logit(self.threshold)

    def overhead_macs_per_token(self, d_model: int, hidden: int) -> int:
        return d_model * (hidden // self.group_size)


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def gated_block_names(setting: str | list[str], blocks: Mapping[str, nn.Module]) -> list[str]:
    """The blocks params.yaml's `mgs.blocks` gates: `all`, or the listed ones (others run dense)."""
    return list(blocks) if setting == "all" else list(setting)


def make_gates(blocks: Mapping[str, nn.Module], names: list[str], group_size: int, threshold: float
               ) -> dict[str, MicroGate]:
    """Fresh gates for the named FFN blocks (DetrMLP modules, by block name)."""
    unknown = sorted(set(names) - set(blocks))
    if unknown:
        raise ValueError(f"mgs.blocks names {', '.join(unknown)}, not FFN blocks of the model; "
                         f"allowed: all, or a list of {', '.join(blocks)}")
    return {name: MicroGate(blocks[name].fc1.in_features, blocks[name].fc1.out_features, group_size, threshold)
            for name in names}


def save_gates(path: str | Path, gates: Mapping[str, MicroGate], info: Mapping[str, object]) -> None:
    """Write a gate set (weights + the settings needed to rebuild it, and `info` about its training)."""
    first = next(iter(gates.values()))
    metadata = {"format": GATES_FORMAT, "group_size": first.group_size, "threshold": first.threshold,
                "blocks": {name: [g.gate.in_features, g.groups * g.group_size] for name, g in gates.items()},
                "info": dict(info)}
    tensors = {}
    for name, gate in gates.items():
        tensors[f"{name}.weight"] = gate.gate.weight.detach().cpu().contiguous()
        tensors[f"{name}.bias"] = gate.gate.bias.detach().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"mgs": json.dumps(metadata, sort_keys=True)})


def gate_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        metadata = (f.metadata() or {}).get("mgs")
    if metadata is None or json.loads(metadata).get("format") != GATES_FORMAT:
        raise ValueError(f"{path} is not an MGS gate file (no {GATES_FORMAT!r} metadata)")
    return json.loads(metadata)


def load_gate_set(path: str | Path, blocks: list[str], producer: str) -> dict[str, MicroGate]:
    """The gate set saved at `path` by stage `producer`, refused unless it gates exactly `blocks` (what `mgs.blocks`
    asks for now): a set made under other settings names the stage to rerun instead of gating the wrong blocks."""
    gates = load_gates(path)
    if sorted(gates) != sorted(blocks):
        raise ValueError(f"{path} gates blocks {', '.join(sorted(gates))}, mgs.blocks asks for "
                         f"{', '.join(sorted(blocks))}; rerun stage {producer}")
    return gates


def load_gates(path: str | Path) -> dict[str, MicroGate]:
    """The gate set saved at `path`, in eval mode."""
    metadata = gate_metadata(path)
    gates = {}
    with safe_open(str(path), framework="pt") as f:
        for name, (d_model, hidden) in metadata["blocks"].items():
            gate = MicroGate(d_model, hidden, metadata["group_size"], metadata["threshold"])
            gate.gate.load_state_dict({"weight": f.get_tensor(f"{name}.weight"), "bias": f.get_tensor(f"{name}.bias")})
            gates[name] = gate.eval()
    return gates
