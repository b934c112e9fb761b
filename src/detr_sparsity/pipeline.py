"""The study's pipeline, declared once: every stage's name, command, input and output paths, params, sweep,
threads and log.

Everything else is derived from this table: the CLI's subcommands (`cli.py`), the Snakemake rules
(`workflow/rules/stages.smk` loops over it) and `dvc.yaml` (`python -m detr_sparsity dvc_yaml` writes it; a test
fails when the committed copy differs). Stages and reporting ask it for paths instead of spelling them.

A stage's code dependencies are not listed here: they are the package modules its stage module imports,
transitively (`code_deps`, read from the import graph), so both orchestrators rerun exactly what an edit can
change.

Paths are templates: `{study}` is the selected study, `{<axis>}` a point of the stage's sweep (a Snakemake
wildcard, a DVC matrix item).
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from detr_sparsity.config import RESULTS, StudyConfig, lookup

PACKAGE = "detr_sparsity"
PACKAGE_DIR = Path(__file__).resolve().parent
# Code paths are given relative to the project root, as both orchestrators run from it.
SOURCE_ROOT = Path("src")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def number(text: str, accept: Callable[[float], bool], allowed: str) -> float:
    """`text` as a number that `accept`s, or an error (argparse prints it, exit 2) saying what is allowed."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {allowed}")
    return value


def unit_fraction(text: str) -> float:
    return number(text, lambda v: 0 < v <= 1, "a keep-ratio k / H in (0, 1]")


def open_fraction(text: str) -> float:
    return number(text, lambda v: 0 < v < 1, "an induced-sparsity target in (0, 1)")


def non_negative(text: str) -> float:
    return number(text, lambda v: v >= 0, "a threshold >= 0 (a firing frequency or a mean activation)")


def one_of(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: allowed values: {', '.join(allowed)}")
        return text
    return parse


@dataclass(frozen=True)
class Axis:
    """One axis of a stage's sweep: a wildcard in its paths, an option of its command, one job per value."""

    name: str
    values: str | tuple[str, ...]  # a dotted key of params.yaml holding the list, or the fixed values
    parse: Callable[[str], Any]  # the command's type: refuses a bad value before any work (exit 2)
    allowed: str  # what parse accepts, in words (the command's help)
    pattern: str  # its Snakemake wildcard constraint

    def points(self, cfg: StudyConfig) -> list:
        return list(self.values) if isinstance(self.values, tuple) else list(lookup(cfg.raw, self.values))


@dataclass(frozen=True)
class Gathered:
    """An input made of one output of upstream stages at every point of their sweeps (their row files, gate
    sets, ...). `fixed` pins an axis to a params value. Not on the command line: the stage asks `gathered`."""

    sources: tuple[tuple[str, str], ...]  # (stage, output)
    fixed: tuple[tuple[str, str], ...] = ()  # (axis, dotted params key)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    message: str  # what Snakemake prints for a job; `{axis}` are its wildcards
    inputs: dict[str, str | Gathered]  # option name -> path template (or a gathered input)
    outputs: dict[str, str]
    sweep: tuple[Axis, ...] = ()
    sections: tuple[str, ...] = ()  # params of the study's block (`studies.<study>.<section>`) it reads
    keys: tuple[str, ...] = ()  # study-independent params (dotted keys of params.yaml) it reads
    directories: frozenset[str] = frozenset()  # outputs that are directories
    metrics: frozenset[str] = frozenset()  # outputs DVC shows with `dvc metrics show`
    # Cores of a job (its torch threads; the data stage's and the summary's processes): 1, or None for every core of
    # the machine (MAX_THREADS in the rules).
    threads: int | None = 1
    exclusive: bool = False  # timings: the job claims the whole machine
    # Of the jobs ready to run, Snakemake starts those of the highest priority first (DVC runs one at a time).
    priority: int = 0
    device: bool = False  # runs the detector on the job's device (a GPU where the cluster gives one)
    detections: str | None = None  # evaluating stages: the output a shard job writes its partial evaluation to
    rows: str | None = None  # evaluating stages: the row output, not written by a shard job
    notes: tuple[str, ...] = field(default=(), compare=False)  # comments for dvc.yaml

    @property
    def module(self) -> str:
        return f"{PACKAGE}.stages.{self.name}"

    @property
    def shardable(self) -> bool:
        return self.detections is not None

    def log(self, shard: bool = False) -> str:
        points = "".join(f"-{{{axis.name}}}" for axis in self.sweep)
        return f"{RESULTS}/logs/{self.name}{points}{'-shard-{shard}' if shard else ''}.log"

    def command_inputs(self) -> dict[str, str]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, str)}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- the stages

METHOD = Axis("method", ("dense",), one_of("dense"), "dense", "dense")
MASKING_METHOD = Axis("method", "masking.methods", one_of("topk", "random", "threshold"), "topk, random or threshold",
                      "topk|random|threshold")
KEEP_RATIO = Axis("keep_ratio", "masking.keep_ratios", unit_fraction, "a keep-ratio k / H in (0, 1]", r"[0-9.]+")
THRESHOLD = Axis("threshold", "sibs.thresholds", non_negative, "a threshold >= 0", r"[0-9.]+")
OBJECTIVE = Axis("objective", "mgs.objectives", one_of("group_activity", "task", "distillation", "oracle"),
                 "group_activity, task, distillation or oracle", "group_activity|task|distillation|oracle")
TARGET = Axis("target", "mgs.targets", open_fraction, "an induced-sparsity target in (0, 1)", r"0\.[0-9]+")
SINGLE_BLOCK_TARGET = Axis("target", "mgs.single_block_targets", open_fraction, "an induced-sparsity target in (0, 1)",
                           r"0\.[0-9]+")

# How an evaluation runs: its split and batch size. Not `evaluate.shards`: sharding never changes a result.
EVALUATION = ("input", "evaluate.split", "evaluate.batch_size")
DATA = f"{RESULTS}/data"
MODEL = f"{RESULTS}/model"
PROFILE = f"{RESULTS}/profile/profile.json"
NEURONS = f"{RESULTS}/profile/neurons.safetensors"
MGS = f"{RESULTS}/mgs/{{objective}}/{{target}}"
MGS_CACHE = f"{RESULTS}/mgs/cache"
LOCAL_GATES = f"{RESULTS}/mgs/local/gates.safetensors"
TRAINED_GATES = f"{RESULTS}/mgs/trained"
SUMMARY = f"{RESULTS}/summary.json"
COMPARISONS = f"{RESULTS}/comparisons.json"
SPEED = f"{RESULTS}/benchmark/speed.json"
COST = f"{RESULTS}/benchmark/cost.json"
PAPER = "paper/{study}"
# The gate-training chain (mgs_cache -> mgs_local -> mgs_train -> mgs_calibrate -> benchmark) holds the largest job
# after pretraining (the end-to-end gate training, about 2.5 minutes on one thread) behind two jobs of its own. Its
# jobs go first and the sweeps beside it (masking, SIBS, the single-block protocol) fill the cores around them;
# started last, the chain leaves a core idle at the end (the committed run of 2026-12-06: the 21 masking jobs first,
# then 19 minutes of chain). So does the paper's setting, the longest job beside the chain (about a minute): started
# last among the sweeps, it ran alone for its whole minute (the committed run of 2026-12-07).
CRITICAL_PATH = 1

STAGES: tuple[Stage, ...] = (
    Stage("data", "generate or download the study's splits",
          "data: preparing the splits of the {study} study",
          inputs={}, outputs={"out": DATA}, sections=("data",), directories=frozenset({"out"}),
          threads=None),
    Stage("model", "pretrain or fetch the dense DETR",
          "model: the dense DETR of the {study} study",
          inputs={"data": DATA}, outputs={"out": MODEL}, sections=("input", "model"),
          directories=frozenset({"out"}), threads=None, device=True),
    Stage("evaluate", "detections, COCO AP, sparsity and FLOPs of the dense model",
          "evaluate: COCO AP of method {method} on the {study} study",
          inputs={"model": MODEL, "data": DATA},
          outputs={"detections": f"{RESULTS}/evaluate/{{method}}/detections.json",
                   "row": f"{RESULTS}/evaluate/{{method}}/row.json"},
          sweep=(METHOD,), sections=EVALUATION, detections="detections", rows="row", device=True),
    Stage("profile", "activation statistics of the dense model on the calibration split",
          "profile: natural sparsity and per-neuron statistics of the dense model",
          inputs={"model": MODEL, "data": DATA}, outputs={"profile": PROFILE, "neurons": NEURONS},
          sections=EVALUATION, keys=("profile.split",), device=True),
    Stage("masking", "top-k, random or threshold keep of hidden activations, every block alone and all at once",
          "masking: {method} keep-ratio {keep_ratio}, every FFN block alone and all at once",
          inputs={"model": MODEL, "data": DATA},
          outputs={"detections": f"{RESULTS}/masking/{{method}}-{{keep_ratio}}/detections",
                   "rows": f"{RESULTS}/masking/{{method}}-{{keep_ratio}}/rows.json"},
          # profile.split: the threshold method calibrates its thresholds on that split
          sweep=(MASKING_METHOD, KEEP_RATIO), sections=EVALUATION,
          keys=("profile.split", "masking.threshold_allocation"),
          directories=frozenset({"detections"}),
          detections="detections", rows="rows", device=True),
    Stage("sibs", "static indicator-based sparsification at one threshold",
          "sibs: static masks at threshold {threshold}, and the shrunk FFN checked against them",
          inputs={"model": MODEL, "data": DATA, "neurons": NEURONS},
          outputs={"detections": f"{RESULTS}/sibs/{{threshold}}/detections.json",
                   "row": f"{RESULTS}/sibs/{{threshold}}/row.json"},
          sweep=(THRESHOLD,), sections=EVALUATION, keys=("sibs.indicator",), detections="detections", rows="row", device=True),
    Stage("mgs_cache", "frozen front end, FFN block inputs and dense outputs of the gate-training images",
          "mgs_cache: backbone features, FFN block inputs and dense outputs of the gate-training images, computed once",
          inputs={"model": MODEL, "data": DATA},
          outputs={"out": f"{MGS_CACHE}/front_end.safetensors", "block_inputs": f"{MGS_CACHE}/block_inputs.safetensors"},
          sections=("input", "mgs.cache"), threads=None, device=True, priority=CRITICAL_PATH),
    Stage("mgs_local", "train the group_activity gates of every block once, layer-locally, from cached block inputs",
          "mgs_local: group_activity gates of every block, trained once from the cached block inputs",
          inputs={"model": MODEL, "block_inputs": f"{MGS_CACHE}/block_inputs.safetensors"},
          outputs={"gates": LOCAL_GATES, "training": f"{RESULTS}/mgs/local/training.json"},
          sections=("mgs.local",), keys=("mgs.group_size", "mgs.blocks", "mgs.gate_threshold"), device=True,
          priority=CRITICAL_PATH),
    # The end-to-end objectives of mgs.objectives (group_activity is mgs_local's), one after another in one job: a
    # sweep over them would be a DVC matrix over mgs.objectives, group_activity included. One thread: the gates are
    # small, and the other core runs the sweeps meanwhile.
    Stage("mgs_train", "train each end-to-end objective's gates once, toward mgs.train_target (model frozen)",
          "mgs_train: the end-to-end objectives' gates, each trained once toward the train target",
          inputs={"model": MODEL, "cache": f"{MGS_CACHE}/front_end.safetensors", "local": LOCAL_GATES},
          outputs={"out": TRAINED_GATES}, sections=("mgs.training",),
          keys=("mgs.objectives", "mgs.train_target", "mgs.group_size", "mgs.blocks", "mgs.gate_threshold"),
          directories=frozenset({"out"}), device=True, priority=CRITICAL_PATH),
    # Every evaluated gate set: an objective's gates trained once (group_activity: mgs_local; the others: mgs_train),
    # calibrated to one target on the calibration split through the gated model.
    Stage("mgs_calibrate", "one objective's gate set calibrated to one induced-sparsity target",
          "mgs_calibrate: {objective} gates calibrated to {target} induced sparsity",
          inputs={"model": MODEL, "data": DATA, "local": LOCAL_GATES, "trained": TRAINED_GATES},
          outputs={"gates": f"{MGS}/gates.safetensors", "training": f"{MGS}/training.json"},
          sweep=(OBJECTIVE, TARGET), sections=("input", "mgs.training"),
          keys=("profile.split", "mgs.group_size", "mgs.blocks", "mgs.gate_threshold", "mgs.calibration"),
          device=True, priority=CRITICAL_PATH),
    Stage("mgs_evaluate", "detections, COCO AP, sparsity and FLOPs of one trained gate set",
          "mgs_evaluate: the {objective} gates of target {target} on the evaluation split",
          inputs={"model": MODEL, "data": DATA, "gates": f"{MGS}/gates.safetensors",
                  "training": f"{MGS}/training.json"},
          outputs={"detections": f"{MGS}/detections.json", "row": f"{MGS}/row.json"},
          sweep=(OBJECTIVE, TARGET), sections=EVALUATION, detections="detections", rows="row", device=True),
    Stage("mgs_single", "each block's group_activity gate alone (the others dense), calibrated to one target",
          "mgs_single: every block's group_activity gate alone at {target} induced sparsity",
          inputs={"model": MODEL, "data": DATA, "local": LOCAL_GATES},
          outputs={"detections": f"{RESULTS}/mgs/single/{{target}}/detections",
                   "rows": f"{RESULTS}/mgs/single/{{target}}/rows.json"},
          sweep=(SINGLE_BLOCK_TARGET,), sections=EVALUATION, keys=("profile.split",),
          directories=frozenset({"detections"}), detections="detections", rows="rows", device=True),
    Stage("mgs_paper_setting", "the paper's literal MGS setting: group_activity gates of G = 8, threshold 0.5, uncalibrated",
          "mgs_paper_setting: group_activity gates in the paper's own setting (G 8, threshold 0.5, no calibration)",
          inputs={"model": MODEL, "data": DATA, "block_inputs": f"{MGS_CACHE}/block_inputs.safetensors"},
          outputs={"gates": f"{RESULTS}/mgs/paper_setting/gates.safetensors",
                   "training": f"{RESULTS}/mgs/paper_setting/training.json",
                   "detections": f"{RESULTS}/mgs/paper_setting/detections.json",
                   "row": f"{RESULTS}/mgs/paper_setting/row.json"},
          # One evaluation, never sharded: it writes its gates and training record beside the row.
          sections=(*EVALUATION, "mgs.local"), keys=("mgs.paper_setting", "mgs.blocks"), device=True,
          priority=CRITICAL_PATH),
    Stage("summary", "gather the rows of every configured evaluation into summary.json",
          "summary: gathering the rows of every evaluation",
          inputs={"rows": Gathered((("evaluate", "row"), ("masking", "rows"), ("sibs", "row"),
                                    ("mgs_evaluate", "row"), ("mgs_single", "rows"), ("mgs_paper_setting", "row")))},
          outputs={"out": SUMMARY, "metrics": f"{RESULTS}/metrics.json", "comparisons": COMPARISONS},
          # which rows are gathered; the intervals of the comparisons
          keys=("masking.methods", "masking.keep_ratios", "sibs.thresholds", "mgs.objectives", "mgs.targets",
                "mgs.single_block_targets", "bootstrap"),
          # every core: it runs after every evaluation, and resamples the detection files one per core
          metrics=frozenset({"out", "metrics"}), threads=None),
    Stage("benchmark", "measured speed of sparse FFN execution (SIBS, MGS) against dense",
          "benchmark: dense vs SIBS vs MGS sparse execution, median ms",
          inputs={"model": MODEL, "data": DATA, "neurons": NEURONS,
                  "gates": Gathered((("mgs_calibrate", "gates"),), fixed=(("objective", "benchmark.objective"),))},
          outputs={"out": SPEED},
          # the study shapes are timed on the first evaluation batch; which rows are measured, and how
          sections=EVALUATION, keys=("benchmark", "sibs.indicator", "sibs.thresholds", "mgs.targets"),
          threads=None, exclusive=True, priority=CRITICAL_PATH),
    # After every stage that computes (summary.json follows every evaluation, speed.json the gate training and the
    # profile): it reads the log of each of their jobs, which names the MLflow run that made the job's outputs. The
    # sweeps say which jobs there are.
    Stage("cost", "the study's cost per stage: wall and CPU time of every job, from the MLflow runs its logs name",
          "cost: wall and CPU time of every job of the {study} study, from the MLflow runs behind its outputs",
          inputs={"summary": SUMMARY, "speed": SPEED}, outputs={"out": COST},
          keys=("masking.methods", "masking.keep_ratios", "sibs.thresholds", "mgs.objectives", "mgs.targets",
                "mgs.single_block_targets")),
    Stage("figures", "the study's figures (PDF + PNG) and captions, from summary.json and comparisons.json",
          "figures: F1-F6 from summary.json, the profile, the gate-training curves and the benchmark",
          inputs={"summary": SUMMARY, "profile": PROFILE, "speed": SPEED, "comparisons": COMPARISONS,
                  "trained": TRAINED_GATES},
          outputs={"out": f"{PAPER}/figures", "plots": f"{RESULTS}/plots"},
          sections=("evaluate.split", "model"), directories=frozenset({"out", "plots"})),
    Stage("tables", "tables T0-T6 as Markdown and LaTeX from summary.json, comparisons.json, speed.json, cost.json",
          "tables: T0-T6 from summary.json, the comparisons, the benchmark and the cost, as Markdown and LaTeX",
          inputs={"summary": SUMMARY, "profile": PROFILE, "model": MODEL, "speed": SPEED, "comparisons": COMPARISONS,
                  "cost": COST},
          outputs={"markdown": f"{RESULTS}/tables", "latex": f"{PAPER}/tables"},
          # model: a model the pipeline pretrains is a stand-in, shown beside DETR-R50's reported regime with its
          # recipe (reported.StandIn)
          sections=("model",), directories=frozenset({"markdown", "latex"})),
    Stage("paper", "build the study's paper PDF from paper/main.tex with latexmk",
          "paper: the {study} study's paper with latexmk",
          inputs={"tex": "paper/main.tex", "figures": f"{PAPER}/figures", "tables": f"{PAPER}/tables"},
          outputs={"pdf": f"{PAPER}/main.pdf"},
          notes=("Needs a LaTeX toolchain (latexmk); without one the command stops with that message after every "
                 "other stage has run (Snakemake's default target leaves it out instead).",)),
)
PIPELINE: dict[str, Stage] = {stage.name: stage for stage in STAGES}

# `dvc plots show`: the sparsity-AP and FLOPs-AP curves, one series per method (the figures stage writes them).
PLOTS = {
    "AP against induced sparsity": ("induced_sparsity", ("topk", "threshold", "random", "sibs", "mgs-group_activity",
                                                          "mgs-task", "mgs-distillation")),
    "AP against FFN FLOPs reduction": ("ffn_flops_reduction", ("sibs", "mgs-group_activity", "mgs-task",
                                                               "mgs-distillation", "topk", "threshold")),
}


def plot_series() -> list[str]:
    """Every series `dvc plots` overlays (PLOTS), once each: the figures stage writes a file for each, empty where
    the study has no such rows."""
    return list(dict.fromkeys(name for _x, names in PLOTS.values() for name in names))


# ---------------------------------------------------------------- paths

def render(template: str, **values: Any) -> str:
    """`template` with the given placeholders filled in; the others stay as they are."""
    return PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], template)


def path(stage: str, output: str, study: str, **point: Any) -> Path:
    """Where `stage` writes `output` for the study (at a point of its sweep)."""
    return Path(render(PIPELINE[stage].outputs[output], study=study, **point))


def gathered(cfg: StudyConfig, stage: str, name: str) -> list[Path]:
    """The files of a gathered input, in pipeline order: every configured point of each source's sweep."""
    return [file for _point, file in gathered_points(cfg, stage, name)]


def gathered_points(cfg: StudyConfig, stage: str, name: str) -> list[tuple[dict[str, Any], Path]]:
    """The files of a gathered input with the sweep point each belongs to."""
    spec = PIPELINE[stage].inputs[name]
    if not isinstance(spec, Gathered):
        raise KeyError(f"input {name} of stage {stage} is not gathered")
    fixed = {axis: lookup(cfg.raw, key) for axis, key in spec.fixed}
    return [(point, path(source, output, cfg.name, **point))
            for source, output in spec.sources for point in sweep_points(PIPELINE[source], cfg, fixed)]


def sweep_points(stage: Stage, cfg: StudyConfig, fixed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every configured point of the stage's sweep (one dict of axis values per job), in params order."""
    points: list[dict[str, Any]] = [{}]
    for axis in stage.sweep:
        values = [fixed[axis.name]] if fixed and axis.name in fixed else axis.points(cfg)
        points = [{**p, axis.name: v} for p in points for v in values]
    return points


def upstream(stage: str) -> list[str]:
    """Every stage whose outputs `stage` reads, directly or through other stages, in pipeline order."""
    producer = {template: spec.name for spec in STAGES for template in spec.outputs.values()}
    found: set[str] = set()
    pending = [stage]
    while pending:
        for spec in PIPELINE[pending.pop()].inputs.values():
            sources = ({name for name, _output in spec.sources} if isinstance(spec, Gathered)
                       else {producer[spec]} if spec in producer else set())
            pending.extend(sources - found)
            found |= sources
    return [name for name in PIPELINE if name in found]


def gathered_root(source: tuple[str, str]) -> str:
    """The directory holding every file of one source of a gathered input (what DVC tracks as the dep):
    results/{study}/mgs/{objective}/{target}/row.json -> results/{study}/mgs."""
    template = render(PIPELINE[source[0]].outputs[source[1]], study="\0")
    if "{" in template:
        head = template.split("{", 1)[0]
        template = head[:head.rfind("/")]
    return template.replace("\0", "{study}")


# ---------------------------------------------------------------- params

def stage_params(cfg: StudyConfig, stage: str) -> dict[str, Any]:
    """The params a stage depends on (what DVC lists under `params:`), for logging, hashing and rerun triggers."""
    spec = PIPELINE[stage]
    study = cfg.raw["studies"][cfg.name]
    return {"study": cfg.name, "seed": cfg.seed, **{s: lookup(study, s) for s in spec.sections},
            **{key: lookup(cfg.raw, key) for key in spec.keys}}


def resources_problem(cfg: StudyConfig) -> str | None:
    """Why the study's `resources` cannot be used (an entry that names no stage, nor `default`), or None."""
    unknown = sorted(set(cfg.resources) - {"default", *PIPELINE})
    if unknown:
        return (f"studies.{cfg.name}.resources: unknown key(s) {', '.join(unknown)}; "
                f"allowed keys: default, {', '.join(PIPELINE)}")
    return None


# ---------------------------------------------------------------- code dependencies

def _module_file(module: str) -> Path | None:
    """The source file of a module of the package, or None (not ours, or not a module)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    if module == PACKAGE:
        return PACKAGE_DIR / "__init__.py"
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / relative.with_suffix(".py"), PACKAGE_DIR / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(file: Path) -> set[str]:
    """The package modules a source file imports, anywhere in it (a function's lazy import counts too), and the
    packages that importing them executes."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import name`: name is a submodule, or something the package itself defines.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if _module_file(m) is not None}


def code_deps(stage: str) -> list[str]:
    """The source files of the stage's module and of every package module it imports, transitively."""
    seen: set[Path] = set()
    module = PIPELINE[stage].module
    pending = [module.rsplit(".", i)[0] for i in range(module.count(".") + 1)]  # with the packages it runs
    while pending:
        file = _module_file(pending.pop())
        if file is None or file in seen:
            continue
        seen.add(file)
        pending.extend(_imports(file))
    return sorted(str(SOURCE_ROOT / f.relative_to(PACKAGE_DIR.parent)) for f in seen)


# ---------------------------------------------------------------- the command

def command(stage: Stage, fill: Callable[[str, str], str], log: str, shard: str | None = None) -> str:
    """The stage's command line. `fill(kind, name)` gives the text of an input, output or axis value (a path, or an
    orchestrator's placeholder for it); a shard job passes `shard` ("K/N") and writes no rows."""
    parts = ["python -m detr_sparsity", "--log", log, stage.name]
    parts += [f"{option(axis.name)} {fill('axis', axis.name)}" for axis in stage.sweep]
    parts += [f"{option(name)} {fill('input', name)}" for name in stage.command_inputs()]
    parts += [f"{option(name)} {fill('output', name)}" for name in stage.outputs
              if not (shard and name == stage.rows)]
    if shard:
        parts.append(f"--shard {shard}")
    return " ".join(parts)


# ---------------------------------------------------------------- dvc.yaml

DVC_HEADER = """\
# Generated from the pipeline's declaration (src/detr_sparsity/pipeline.py) by `python -m detr_sparsity dvc_yaml`;
# do not edit: a test fails when this file differs from what the declaration generates. The Snakemake rules
# (workflow/rules/stages.smk) are derived from the same declaration. ${study} comes from params.yaml.
"""


def dvc_stage(stage: Stage) -> dict[str, Any]:
    """One stage of dvc.yaml: a matrix over its sweep's params, its command, deps, params and outs."""
    study = "${study}"

    def at(template: str) -> str:
        return render(template, study=study, **{a.name: f"${{item.{a.name}}}" for a in stage.sweep})

    deps = [*code_deps(stage.name)]
    for name, spec in stage.inputs.items():
        if isinstance(spec, Gathered):
            deps += [render(gathered_root(source), study=study) for source in spec.sources]
        else:
            deps.append(at(spec))
    entry: dict[str, Any] = {}
    if stage.sweep:
        entry["matrix"] = {a.name: (list(a.values) if isinstance(a.values, tuple) else f"${{{a.values}}}")
                           for a in stage.sweep}
    values = {**{("input", k): at(v) for k, v in stage.command_inputs().items()},
              **{("output", k): at(v) for k, v in stage.outputs.items()},
              **{("axis", a.name): f"${{item.{a.name}}}" for a in stage.sweep}}
    entry["cmd"] = command(stage, lambda kind, name: values[(kind, name)], at(stage.log()))
    entry["deps"] = list(dict.fromkeys(deps))
    entry["params"] = ["study", "seed", *(f"studies.{study}.{s}" for s in stage.sections), *stage.keys]
    outs = [at(v) for k, v in stage.outputs.items() if k not in stage.metrics] + [at(stage.log())]
    metrics = [at(v) for k, v in stage.outputs.items() if k in stage.metrics]
    if metrics:
        entry["metrics"] = metrics
    entry["outs"] = outs
    return entry


def dvc_yaml() -> str:
    """The text of dvc.yaml."""
    import yaml

    plots = [{title: {"template": "linear", "x": x,
                      "y": {f"results/${{study}}/plots/{series}.csv": "AP" for series in names}}}
             for title, (x, names) in PLOTS.items()]
    blocks = []
    for stage in STAGES:
        text = yaml.safe_dump({stage.name: dvc_stage(stage)}, sort_keys=False, width=1000)
        comments = "".join(f"  # {note}\n" for note in stage.notes)
        blocks.append(comments + "\n".join("  " + line for line in text.rstrip().splitlines()))
    plots_text = yaml.safe_dump({"plots": plots}, sort_keys=False, width=1000)
    return DVC_HEADER + "stages:\n" + "\n\n".join(blocks) + "\n\n" + plots_text


def describe(stages: Iterable[Stage] = STAGES) -> str:
    """One line per stage: its name, sweep, threads, whether it runs the detector on the job's device, outputs."""
    lines = [f"{'stage':13} {'sweep':22} {'threads':7} {'device':6} outputs"]
    for stage in stages:
        sweep = " x ".join(a.name for a in stage.sweep) or "-"
        lines.append(f"{stage.name:13} {sweep:22} {stage.threads or 'all'!s:7} {'yes' if stage.device else '-':6} "
                     f"{', '.join(stage.outputs.values())}")
    return "\n".join(lines)
