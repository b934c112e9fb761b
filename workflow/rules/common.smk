# Shared helpers of the rule files.
import glob


def code(*packages):
    """The stage's own source files: editing them reruns the stage (dvc.yaml lists the same directories)."""
    return sorted(f for p in packages for f in glob.glob(f"src/detr_sparsity/{p}/**/*.py", recursive=True))


def stage_params(stage):
    """The params the stage depends on; a change reruns it (Snakemake's params rerun trigger)."""
    return CFG.stage_params(stage)


# Torch threads per job (Snakemake exports OMP_NUM_THREADS=threads, which torch honours): never more than
# the machine has, whatever --cores says.
MAX_THREADS = min(workflow.cores, os.cpu_count() or 1)
