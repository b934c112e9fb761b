"""The gated DETR exported to ONNX computes, under onnxruntime, the gates' masks and the detections of the masked
model PyTorch evaluated (needs the `export` extra: onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_sparsity.execution.gated_detr import SparseGatedFFN, add_gates
from detr_sparsity.execution.onnx_export import GatedDetrGraph, export_onnx
from detr_sparsity.mgs.gates import make_gates
from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
from detr_sparsity.sparsity.ffn import ffn_blocks

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# One encoder and one decoder block keep the export short; the graph's structure is the same at any depth.
ARCH = {"d_model": 32, "ffn_dim": 256, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]


@pytest.mark.slow
def test_onnx_export_gives_the_masks_then_the_detections(tmp_path):
    torch.manual_seed(0)
    model = build_small_detr(small_detr_config(ARCH, CATEGORIES)).eval()
    blocks = ffn_blocks(model)
    gates = make_gates(blocks, list(blocks), 16, 0.5)
    for gate in gates.values():  # about half the groups open, differently per token
        nn.init.normal_(gate.gate.weight, std=0.5)
        nn.init.normal_(gate.gate.bias, std=0.5)
    model = add_gates(model, gates, execution="sparse").eval()
    path = export_onnx(model, tmp_path / "gated.onnx", height=64, width=96, masks=True)
    assert all(isinstance(b, SparseGatedFFN) for b in ffn_blocks(model).values())  # the caller's model unchanged

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = GatedDetrGraph(model, masks=True)  # sparse execution here: the reference is PyTorch's own kernel
    names = graph.output_names()
    assert [o.name for o in session.get_outputs()] == names == [
        "logits", "pred_boxes", "open_groups.encoder.0", "open_groups.decoder.0"]
    # Other sizes than the traced one, and a padded image: batch, height and width are dynamic.
    for batch, height, width in ((3, 96, 128), (1, 80, 72)):
        generator = torch.Generator().manual_seed(batch)
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
        pixel_mask[-1, :, width // 2:] = 0
        got = dict(zip(names, session.run(None, {"pixel_values": pixel_values.numpy(),
                                                 "pixel_mask": pixel_mask.numpy()})))
        with torch.no_grad():
            expected = dict(zip(names, graph(pixel_values, pixel_mask)))
        for name in names[2:]:  # first the same gates: every (token, group) decision equal
            assert got[name].dtype == bool and torch.equal(torch.from_numpy(got[name]), expected[name]), name
            assert 0.1 < expected[name].float().mean() < 0.9  # the gates really decide
        for name in names[:2]:  # then the same detections, within float rounding
            torch.testing.assert_close(torch.from_numpy(got[name]), expected[name], rtol=1e-4, atol=1e-4)
