"""A gated DETR to take away: a dense DETR with a saved MGS gate set built into its FFN blocks.

    from detr_sparsity.execution.gated_detr import load_gated_detr
    model = load_gated_detr("results/synthetic/model", "results/synthetic/mgs/distillation/0.9/gates.safetensors",
                            execution="sparse")

The result is an ordinary `DetrForObjectDetection` (eval mode), so `DetrImageProcessor.post_process_object_detection`
and everything else that takes a DETR works unchanged. Its gated FFN blocks execute one of two ways:
- `masked` (the default): what the study evaluated, fc2(m * relu(fc1 x)) with m the gate's hard group mask,
  dense fc1 and fc2 (the same operations as the evaluation's wrapper, without its counters);
- `sparse`: only the groups the gate opens are computed, per token (inference only; `gated_ffn`).

One folder per gated model, to hand to someone else (`save_gated` / `load_gated`):

    save_gated(model, "gated-detr-0.9")          # config.json + model.safetensors: the dense DETR (save_pretrained)
    model = load_gated("gated-detr-0.9", execution="sparse")   # gates.safetensors: the gates; gated_detr.json

`gated_detr.json` holds the folder's format version, the default execution, the gate settings and where the dense
weights came from. The folder is an ordinary transformers model directory too: `DetrForObjectDetection.
from_pretrained(folder)` gives the dense DETR. ONNX export: `onnx_export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import atomic_dir
from detr_sparsity.execution.gated_ffn import PackedFFN, check_execution, sparse_ffn
from detr_sparsity.mgs.gates import MicroGate, gate_metadata, load_gates, save_gates
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
    source = {"source": (model.config.name_or_path or None) if isinstance(model, DetrForObjectDetection)
              else str(model), "revision": revision}
    if not isinstance(model, DetrForObjectDetection):
        model = load_detr(model, revision)
    model = add_gates(model.eval(), load_gates(gates), execution).eval()
    model.gated_from = {"dense_weights": source, "gates": {"file": str(gates), "info": gate_metadata(gates)["info"]}}
    return model


# ---------------------------------------------------------------- one folder per gated model

GATED_FORMAT = "detr-sparsity-gated-detr/1"
GATED_CONFIG = "gated_detr.json"
GATES_FILE = "gates.safetensors"


def gated_blocks(model: DetrForObjectDetection) -> dict[str, GatedFFN | SparseGatedFFN]:
    """The gated FFN blocks of `model`, by block name."""
    return {name: block for name, block in ffn_blocks(model).items() if isinstance(block, tuple(GATED.values()))}


def save_gated(model: DetrForObjectDetection, directory: str | Path, processor: Any = None,
               source: str | None = None) -> Path:
    """Write a gated DETR to one folder: the dense DETR (`save_pretrained`, safetensors), its gates (the MGS gate
    file), `gated_detr.json` and, if given, the image processor. `source` names where the dense weights came
    from (default: what `load_gated_detr` / `load_gated` recorded). An existing folder is replaced only if it
    holds a saved gated model; the folder appears complete or not at all. Returns the folder."""
    directory = Path(directory)
    blocks = gated_blocks(model)
    if not blocks:
        raise ValueError("the model has no gated FFN blocks: build gates in first (load_gated_detr or add_gates)")
    if directory.exists() and not (directory / GATED_CONFIG).is_file() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and holds no saved gated model ({GATED_CONFIG}); "
                              f"choose a new or empty folder")
    origin = getattr(model, "gated_from", {})
    dense_source = {"source": source, "revision": None} if source is not None else origin.get(
        "dense_weights", {"source": model.config.name_or_path or None, "revision": None})
    gates = {name: block.gate for name, block in blocks.items()}
    first = next(iter(gates.values()))
    config = {
        "format": GATED_FORMAT,
        "execution": "sparse" if any(isinstance(b, SparseGatedFFN) for b in blocks.values()) else "masked",
        "gates": {"file": GATES_FILE, "group_size": first.group_size, "threshold": first.threshold,
                  "blocks": list(gates)},
        "dense_weights": dense_source,
        "gates_trained": origin.get("gates"),
    }
    with atomic_dir(directory) as tmp:
        # The dense DETR as transformers saves it: each gated block's own DetrMLP back in place while saving.
        replace_ffns(model, lambda name, block: blocks[name].block if name in blocks else None)
        try:
            model.save_pretrained(tmp)
        finally:
            replace_ffns(model, lambda name, block: blocks.get(name))
        save_gates(tmp / GATES_FILE, gates, (origin.get("gates") or {}).get("info") or {})
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / GATED_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def gated_config(directory: str | Path) -> dict:
    """The `gated_detr.json` of a folder written by `save_gated`."""
    path = Path(directory) / GATED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a gated model saved by save_gated")
    config = json.loads(path.read_text())
    if config.get("format") != GATED_FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r} is not supported: allowed: {GATED_FORMAT!r}")
    return config


def load_gated(directory: str | Path, execution: str | None = None) -> DetrForObjectDetection:
    """The gated DETR saved by `save_gated` in `directory`, in eval mode, executing its gated FFN blocks as
    `execution` ('masked' or 'sparse'; default: the execution it was saved with)."""
    config = gated_config(directory)
    execution = check_execution(execution or config["execution"])
    model = add_gates(load_detr(directory).eval(), load_gates(Path(directory) / config["gates"]["file"]),
                      execution).eval()
    model.gated_from = {"dense_weights": config["dense_weights"], "gates": config.get("gates_trained")}
    return model
