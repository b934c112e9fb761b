"""ONNX export of the gated DETR (gates included), for runtimes without PyTorch, such as onnxruntime.

    from detr_sparsity.atomic import atomic_path
from detr_sparsity.execution.gated_detr import load_gated
    from detr_sparsity.execution.onnx_export import export_onnx
    export_onnx(load_gated("gated-detr-0.9"), "gated-detr-0.9.onnx")

The graph computes the masked model, what the study evaluated: each gated block's gate, its hard group mask, and
dense fc1 and fc2 with the skipped neurons masked (the sparse CPU kernel is a PyTorch extension and has no ONNX
form). Inputs `pixel_values` (batch, 3, height, width, float32) and `pixel_mask` (batch, height, width, int64),
batch, height and width dynamic; outputs `logits` and `pred_boxes` as `DetrForObjectDetection` returns them, so
`DetrImageProcessor.post_process_object_detection` takes them unchanged. With `masks=True` the graph also returns
each gated block's open-group mask, `open_groups.<block>` (bool, (batch, tokens, groups)), to check a runtime's
gates against PyTorch's. The exporter is torch's (`torch.onnx.export`, which needs `onnxscript`); the optional
extra `export` installs it and onnxruntime.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import DetrForObjectDetection

from detr_sparsity.atomic import atomic_path
from detr_sparsity.execution.gated_detr import GatedFFN, gated_blocks, set_execution

INPUT_NAMES = ["pixel_values", "pixel_mask"]
DYNAMIC_SHAPES = {"pixel_values": {0: "batch", 2: "height", 3: "width"},
                  "pixel_mask": {0: "batch", 1: "height", 2: "width"}}


class GatedDetrGraph(nn.Module):
    """What the ONNX graph computes: the gated DETR's logits and boxes, and with `masks` each gated block's
    open-group mask (in the order the blocks run: encoder, then decoder)."""

    def __init__(self, model: DetrForObjectDetection, masks: bool = False) -> None:
        super().__init__()
        self.model, self.masks = model, masks
        self.block_names = list(gated_blocks(model))

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        opened: list[torch.Tensor] = []
        hooks = []
        if self.masks:
            blocks = gated_blocks(self.model)
            hooks = [blocks[name].gate.register_forward_hook(
                lambda gate, _inputs, logits: opened.append(gate.open_groups(logits))) for name in self.block_names]
        try:
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        finally:
            for hook in hooks:
                hook.remove()
        return (outputs.logits, outputs.pred_boxes, *opened)

    def output_names(self) -> list[str]:
        return ["logits", "pred_boxes", *(f"open_groups.{name}" for name in self.block_names if self.masks)]


def export_onnx(model: DetrForObjectDetection, path: str | Path, height: int = 800, width: int = 1066,
                masks: bool = False) -> Path:
    """Write the gated `model` (either execution; the graph is the masked one) as ONNX to `path`, traced on one
    image of height x width (any size runs afterwards). Returns the path."""
    if not gated_blocks(model):
        raise ValueError("the model has no gated FFN blocks: build gates in first (load_gated_detr or load_gated)")
    if not all(isinstance(block, GatedFFN) for block in gated_blocks(model).values()):
        model = set_execution(copy.deepcopy(model), "masked")  # leave the caller's model as it is
    graph = GatedDetrGraph(model, masks).eval()
    parameter = next(model.parameters())
    # Two images: the exporter would fix a batch of one as a constant.
    example = (torch.zeros(2, 3, height, width, dtype=parameter.dtype, device=parameter.device),
               torch.ones(2, height, width, dtype=torch.long, device=parameter.device))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # Both inputs name their first axis "batch" on purpose (one size); the exporter remarks on it.
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        torch.onnx.export(graph, example, str(tmp), input_names=INPUT_NAMES, output_names=graph.output_names(),
                          dynamic_shapes=DYNAMIC_SHAPES, dynamo=True, verbose=False)
    return Path(path)
