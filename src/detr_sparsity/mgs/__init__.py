"""MGS, micro-gated sparsification: gates, their training on a frozen DETR from a cached front end, and their
calibration to a sparsity target (the gated model to take away: `detr_sparsity.execution.gated_detr`)."""
