"""Executing sparsified FFN blocks without the skipped work (SIBS: `detr_sparsity.sparsity.shrink`; MGS: here)."""

from detr_sparsity.execution.gated_detr import SparseGatedFFN, load_gated_detr, set_execution
from detr_sparsity.execution.gated_ffn import EXECUTIONS, PackedFFN, dispatch_ffn, sparse_ffn

__all__ = ["EXECUTIONS", "PackedFFN", "SparseGatedFFN", "dispatch_ffn", "load_gated_detr", "set_execution",
           "sparse_ffn"]
