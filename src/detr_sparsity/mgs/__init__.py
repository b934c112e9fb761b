"""MGS, micro-gated sparsification: gates, their training on a frozen DETR, and the gated model to take away."""

from detr_sparsity.mgs.gated_detr import load_gated_detr

__all__ = ["load_gated_detr"]
