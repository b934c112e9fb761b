"""Executing sparsified FFN blocks without the skipped work (SIBS: `detr_sparsity.sparsity.shrink`; MGS: the gated
model of `gated_detr`, its kernels in `gated_ffn` and `cpu_kernel`; their measured speed in `benchmark`)."""
