"""The pipeline's stages, one module each (`detr_sparsity.pipeline` declares them): the I/O, the tracking and the
row of one step. The libraries (`data`, `models`, `sparsity`, `evaluation`, `mgs`, `execution`, `reporting`)
compute, and import no stage. Each module's `run_stage(cfg, tracked, **paths_and_point)` is what the CLI calls.
"""
