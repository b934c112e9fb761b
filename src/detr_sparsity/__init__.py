"""Reproducible study of dynamic activation sparsity in pretrained DETR."""

__version__ = "0.1.0"
