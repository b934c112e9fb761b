"""A tiny randomly initialised DETR and pixel batches as the collate makes them, shared by the MGS tests."""

from __future__ import annotations

import torch

from detr_sparsity.models.small_detr import build_small_detr, small_detr_config

D, H, G = 32, 256, 16
ARCH = {"d_model": D, "ffn_dim": H, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
        "num_queries": 10, "backbone_hidden_sizes": [8, 16, 32], "backbone_depths": [1, 1, 1], "dropout": 0.0}
CATEGORIES = [{"id": i + 1, "name": f"class{i}"} for i in range(4)]


def tiny_detr():
    torch.manual_seed(0)
    return build_small_detr(small_detr_config(ARCH, CATEGORIES)).eval()


def batches(n_batches=2, images=4, padded=True):
    """Pixel batches as the collate makes them; with `padded`, the last image of a batch is narrower."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        pixel_values = torch.randn(images, 3, 96, 128, generator=generator)
        pixel_mask = torch.ones(images, 96, 128, dtype=torch.long)
        if padded:
            pixel_mask[-1, :, 64:] = 0
            pixel_values[-1, :, :, 64:] = 0
        labels = [{"class_labels": torch.randint(0, 4, (2,), generator=generator),
                   "boxes": torch.rand(2, 4, generator=generator) * 0.5 + 0.25} for _ in range(images)]
        out.append({"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels})
    return out
