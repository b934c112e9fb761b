# Shared helpers of the rule files.
import glob
from pathlib import Path


def code(*packages):
    """The stage's own source files: editing them reruns the stage (dvc.yaml lists the same directories)."""
    return sorted(f for p in packages for f in glob.glob(f"src/detr_sparsity/{p}/**/*.py", recursive=True))


def stage_params(stage):
    """The params the stage depends on; a change reruns it (Snakemake's params rerun trigger)."""
    return CFG.stage_params(stage)


# Torch threads per job (Snakemake exports OMP_NUM_THREADS=threads, which torch honours): never more than
# the machine has, whatever --cores says.
# `snakemake --report` and other commands that run nothing give no --cores; the machine's count stands in.
MAX_THREADS = min(workflow.resource_settings.cores or os.cpu_count() or 1, os.cpu_count() or 1)

# Jobs at once: each claims one `cpu_slots` per thread, and the machine has one slot per core, so
# `--cores 8` on a 2-core machine runs two one-thread jobs at a time, not eight (eight gate trainings on two
# cores ran at half the throughput of two: measured 8.8 against about 20 steps/s in all). Where the cores
# are elsewhere (a cluster), `--resources cpu_slots=N` sets the limit instead.
if "cpu_slots" not in workflow.global_resources:
    workflow.register_resource("cpu_slots", os.cpu_count() or 1)


def cpu_slots(wildcards, threads):
    return threads


def job_resources(stage):
    """mem_mb, runtime (minutes) and gpu of the stage's jobs, from params.yaml's studies.<study>.resources: what a
    cluster executor asks for (workflow/profiles/slurm). Resources are no rerun trigger: changing them reruns nothing."""
    return CFG.job_resources(stage)


# Sharded evaluation (evaluation/shards.py): with studies.<study>.evaluate.shards = N > 1, each evaluating rule
# below has a `<rule>_shard` twin run once per shard; the rule itself then gathers the shards' partial
# evaluations (temporary files) into the same outputs an unsharded job writes.
SHARDS = CFG.shards


def shard_output(path):
    """Where shard {shard} of SHARDS writes its partial evaluation for `path`, a detections file or directory."""
    path = Path(path)
    return str(path.parent / "shards" / f"{{shard}}-of-{SHARDS}" / path.name)


def shard_partials(path):
    """The partial evaluations a gather job reads for `path`, in shard order; none when evaluating unsharded."""
    if SHARDS == 1:
        return []
    return [shard_output(path).replace("{shard}", str(k)) for k in range(1, SHARDS + 1)]


def gather_option(wildcards, input):
    return " --gather " + " ".join(input.shards) if input.shards else ""
