"""A tiny randomly initialised DETR and pixel batches as the collate makes them, shared by the MGS tests."""

from __future__ import annotations

import torch

from detr_sparsity.models.small_detr import build_small_detr, small_detr_config

D, H, G = 32, 256, 16
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]  # labels 1..4, 0 is "N/A", 5 "no object"
BLOCKS = ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]  # the FFN blocks of a 2 + 2 layer DETR


def tiny_detr(arch=ARCH):
    """A DETR of architecture `arch` (default ARCH) over CATEGORIES, seeded, in eval mode."""
    torch.manual_seed(0)
    return build_small_detr(small_detr_config(arch, CATEGORIES)).eval()


def batches(n_batches=2, images=4, padded=True, label_range=(0, 4)):
    """Pixel batches as the collate makes them; with `padded`, the last image of a batch is narrower. Class labels
    are drawn from range(*label_range)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        pixel_values = torch.randn(images, 3, 96, 128, generator=generator)
        pixel_mask = torch.ones(images, 96, 128, dtype=torch.long)
        if padded:
            pixel_mask[-1, :, 64:] = 0
            pixel_values[-1, :, :, 64:] = 0
        labels = [{"class_labels": torch.randint(*label_range, (2,), generator=generator),
                   "boxes": torch.rand(2, 4, generator=generator) * 0.5 + 0.25} for _ in range(images)]
        out.append({"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels})
    return out
