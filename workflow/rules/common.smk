# Shared by the rules: the declaration's stages as rule parts, how jobs share the machine's cores, and sharded
# evaluation.
import os
import re
from pathlib import Path

from detr_sparsity.pipeline import code_deps, command, gathered, render
from detr_sparsity.reporting.figures import captions
from detr_sparsity.reporting.reported import stand_in


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
REPORT_PARAMS = {"figures": {"captions": captions(STUDY, CFG.profile["split"], CFG.evaluate["split"],
                                                     stand_in(CFG.model))}}


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


# ---------------------------------------------------------------- a cluster job killed for its memory

# What a scheduler says of a job it killed for using more memory than it asked for: Slurm's OverMemoryKill writes
# "exceeded memory limit" into the job's log, its cgroup plugin "oom_kill event" or "oom-kill", and sacct's state is
# then OUT_OF_MEMORY. Snakemake's error names the job's rule and log, not the memory; onerror (Snakefile) names the
# setting to raise. (`rule\s` below, not a space: `snakemake --lint` takes "rule", text, colon for a rule.)
MEMORY_KILLED = re.compile(r"exceeded memory limit|oom[-_ ]kill|OUT_OF_MEMORY", re.IGNORECASE)
FAILED_JOB = re.compile(r"^Error in rule\s(\w+)\W", re.M)


def memory_killed_jobs(snakemake_logs):
    """(rule, job log) of each failed job that its scheduler killed for its memory, read off Snakemake's log of
    the run (onerror's `log`: a list of paths), whose error block of a failed job names its rule, the scheduler's
    message and the job's logs."""
    text = ""
    for path in [snakemake_logs] if isinstance(snakemake_logs, (str, Path)) else snakemake_logs or []:
        try:
            text += Path(path).read_text(errors="replace")
        except OSError:
            pass
    killed = []
    starts = list(FAILED_JOB.finditer(text))
    for found, after in zip(starts, starts[1:] + [None]):
        block = text[found.start():after.start() if after else len(text)]
        body = re.split(r"\n(?=\S)", block, maxsplit=1)[0]  # the indented lines under the block's first
        logs = re.search(r"^\s+log\W (.*?)(?: \(check log file|$)", body, re.M)
        paths = [Path(p) for p in logs[1].split(", ")] if logs else []
        evidence = [p for p in paths if p.is_file() and MEMORY_KILLED.search(p.read_text(errors="replace"))]
        if evidence or MEMORY_KILLED.search(body):
            killed.append((found[1], ", ".join(map(str, evidence or paths)) or "its log"))
    return killed


def memory_hints(snakemake_logs):
    """One line per job killed for its memory, naming its rule, its mem_mb and the setting to raise."""
    hints = []
    for failed_rule, job_log in memory_killed_jobs(snakemake_logs):
        stage = failed_rule.removesuffix("_shard")
        hints.append(f"NOTE: the job of rule {failed_rule} was killed for using more memory than it requested "
                     f"(mem_mb={CFG.job_resources(stage).get('mem_mb')}; read {job_log}). Raise "
                     f"studies.{STUDY}.resources.{stage}.mem_mb in params.yaml (or for one run "
                     f"--set-resources {failed_rule}:mem_mb=<MB>) and run again; finished jobs do not rerun.")
    return hints
