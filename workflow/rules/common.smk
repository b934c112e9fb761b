# Shared by the rules: the declaration's stages as rule parts, how jobs share the machine's cores, and sharded
# evaluation.
import os
from pathlib import Path

from detr_sparsity.pipeline import code_deps, command, gathered, render
from detr_sparsity.reporting.figures import captions


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


def all_cpu_slots(wildcards, threads):
    """A timing job claims every core, so nothing runs beside it."""
    return os.cpu_count() or 1


# Sharded evaluation (evaluation/shards.py): with studies.<study>.evaluate.shards = N > 1, each evaluating stage
# gets a `<stage>_shard` rule run once per shard; the stage's own rule then gathers the shards' partial
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


# ---------------------------------------------------------------- the declaration's stages as rule parts

# Snakemake's report (`snakemake --report report.html`): which outputs it shows, under what caption.
REPORT = {
    ("figures", "out"): dict(patterns=["{figure}.png"], caption="../report/figure.rst", category="Figures"),
    ("tables", "markdown"): dict(patterns=["{table}.md"], caption="../report/table.rst", category="Tables"),
    ("paper", "pdf"): dict(caption="../report/paper.rst", category="Paper"),
}
# The figures' captions, for the report's figure.rst (the figures stage writes the same text beside them).
REPORT_PARAMS = {"figures": {"captions": captions(STUDY, CFG.profile["split"], CFG.evaluate["split"])}}


def at(template):
    """A declared path for this study; a sweep's axes stay as wildcards."""
    return render(template, study=STUDY)


def snakemake_command(stage, shard=None):
    """The stage's command with Snakemake's placeholders: the same text as dvc.yaml's once they are filled."""
    fill = {"input": "{{input.{}}}", "output": "{{output.{}}}", "axis": "{{wildcards.{}}}"}
    text = command(stage, lambda kind, name: fill[kind].format(name), "{log}", shard)
    return text + ("" if shard or not stage.shardable else "{params.gather}")


def inputs(stage):
    found = {"code": code_deps(stage.name)}
    for name, spec in stage.inputs.items():
        found[name] = at(spec) if isinstance(spec, str) else [str(p) for p in gathered(CFG, stage.name, name)]
    return found


def outputs(stage):
    found = {}
    for name, template in stage.outputs.items():
        path = directory(at(template)) if name in stage.directories else at(template)
        found[name] = report(path, **REPORT[(stage.name, name)]) if (stage.name, name) in REPORT else path
    return found


# Each rule's command, by its name. A `shell` directive is evaluated twice, where its rule is defined (in the
# loop over the stages), and again when a job runs, after the loop has moved on; then the job's own `rule` names
# the command.
COMMANDS = {}


def command_for(scope, name):
    return COMMANDS[scope["rule"] if "rule" in scope else name]
