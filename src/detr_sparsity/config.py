"""params.yaml -> one validated, typed configuration of the selected study.

Validation happens once, before any stage does work: a JSON schema (workflow/schemas/params.schema.yaml)
checks shapes, types and ranges, then a few cross-field checks follow. Every error names the key, the bad
value and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PACKAGE_ROOT = Path(__file__).resolve().parent
SCHEMA_FILENAME = Path("workflow/schemas/params.schema.yaml")
# Where a study's outputs live (the pipeline's declaration spells every path below it), and its checkpoints.
RESULTS = "results/{study}"


class ConfigError(ValueError):
    """A bad value in params.yaml."""


@dataclass(frozen=True)
class InputSize:
    shortest_edge: int
    longest_edge: int


@dataclass(frozen=True)
class StudyConfig:
    """Settings of the selected study, plus the study-independent ones."""

    name: str
    seed: int
    experiment: str
    data: dict[str, Any]
    input: InputSize
    model: dict[str, Any]
    evaluate: dict[str, Any]
    gate_training: dict[str, Any]  # the study's MGS budget: `cache`, `local` and `training`
    raw: dict[str, Any] = field(repr=False)
    # What each stage's job asks a scheduler for, per stage name plus `default`. Not among any stage's params:
    # resources never change a result.
    resources: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    @property
    def profile(self) -> dict[str, Any]:
        return self.raw["profile"]

    @property
    def masking(self) -> dict[str, Any]:
        return self.raw["masking"]

    @property
    def sibs(self) -> dict[str, Any]:
        return self.raw["sibs"]

    @property
    def mgs(self) -> dict[str, Any]:
        return self.raw["mgs"]

    @property
    def benchmark(self) -> dict[str, Any]:
        return self.raw["benchmark"]

    @property
    def results_dir(self) -> Path:
        return Path(RESULTS.format(study=self.name))

    @property
    def shards(self) -> int:
        """Detection jobs per evaluation under Snakemake (evaluation.shards); 1 runs each evaluation whole."""
        return self.evaluate["shards"]

    def job_resources(self, stage: str) -> dict[str, int]:
        """mem_mb, runtime (minutes) and gpu of one stage's jobs: its entry over `default`; no `gpu` key if 0."""
        merged = {**self.resources.get("default", {}), **self.resources.get(stage, {})}
        if not merged.get("gpu"):
            merged.pop("gpu", None)
        return merged



def lookup(raw: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key (`mgs.targets`, `evaluate.split`)."""
    value = raw
    for part in dotted.split("."):
        value = value[part]
    return value


def _schema_path(params_path: Path) -> Path:
    # The schema lives beside params.yaml in a checkout; fall back to the package's project root.
    for root in (params_path.resolve().parent, PACKAGE_ROOT.parents[1]):
        if (root / SCHEMA_FILENAME).exists():
            return root / SCHEMA_FILENAME
    raise FileNotFoundError(f"cannot find {SCHEMA_FILENAME} next to {params_path}")


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable sentence for a schema violation: key, bad value, what is allowed."""
    key, value, rule, kind = _key(error.absolute_path), error.instance, error.validator_value, error.validator
    allowed = {
        "minimum": lambda: f"must be >= {rule}",
        "maximum": lambda: f"must be <= {rule}",
        "exclusiveMinimum": lambda: f"must be > {rule}",
        "exclusiveMaximum": lambda: f"must be < {rule}",
        "enum": lambda: f"allowed values: {', '.join(map(str, rule))}",
        "type": lambda: f"must be of type {rule}",
        "minItems": lambda: f"needs at least {rule} item(s)",
        "uniqueItems": lambda: "items must be unique",
        "pattern": lambda: f"must match {rule!r}",
        "minLength": lambda: f"must have at least {rule} character(s)",
        "oneOf": lambda: f"allowed: {error.schema.get('description', 'see the schema')}",
    }
    if kind == "required":
        missing = [k for k in rule if k not in value]
        return f"{key}: missing key(s) {', '.join(missing)}"
    if kind == "additionalProperties":
        extra = sorted(set(value) - set(error.schema.get("properties", {})))
        allowed_keys = ", ".join(sorted(error.schema.get("properties", {})))
        return f"{key}: unknown key(s) {', '.join(extra)}; allowed keys: {allowed_keys}"
    reason = allowed[kind]() if kind in allowed else error.message
    return f"{key} = {json.dumps(value)} is not allowed: {reason}"


def validate(raw: dict[str, Any], schema: dict[str, Any], source: str = "params.yaml") -> None:
    """Raise ConfigError listing every violation of the schema and of the cross-field rules of `source`'s settings."""
    validator = jsonschema.Draft202012Validator(schema)
    problems = [_describe(e) for e in sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))]
    if not problems:
        problems = _cross_field_problems(raw)
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))


def _cross_field_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    study = raw["study"]
    if study not in raw["studies"]:
        return [f"study = {json.dumps(study)} is not allowed: known studies: {', '.join(raw['studies'])}"]
    cfg = raw["studies"][study]
    prefix = f"studies.{study}"
    data, model = cfg["data"], cfg["model"]
    if data["source"] == "synthetic" and data["min_objects"] > data["max_objects"]:
        problems.append(f"{prefix}.data.min_objects = {data['min_objects']} is not allowed: "
                        f"must be <= max_objects ({data['max_objects']})")
    if data["source"] == "coco":
        problems += _coco_data_problems(data, prefix)
    if model["source"] == "hub":
        name = model["name_or_path"]
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and not (Path(name).expanduser() / "config.json").is_file():
            problems.append(f"{prefix}.model.name_or_path = {json.dumps(name)} is not allowed: "
                            "a local model directory must exist and hold config.json")
    if model["source"] == "pretrain":
        arch = model["architecture"]
        if arch["d_model"] % arch["attention_heads"]:
            problems.append(f"{prefix}.model.architecture.d_model = {arch['d_model']} is not allowed: "
                            f"must be divisible by attention_heads ({arch['attention_heads']})")
        if len(arch["backbone_hidden_sizes"]) != len(arch["backbone_depths"]):
            problems.append(f"{prefix}.model.architecture.backbone_depths = {arch['backbone_depths']} is not "
                            "allowed: needs one depth per entry of backbone_hidden_sizes")
        batch = model["pretrain"]["batch_size"]
        if data["source"] == "synthetic" and batch > data["splits"]["train"]:
            problems.append(f"{prefix}.model.pretrain.batch_size = {batch} is not allowed: "
                            f"must be <= data.splits.train ({data['splits']['train']})")
        copies = model["pretrain"]["target_copies"]
        if data["source"] == "synthetic" and arch["num_queries"] < copies * data["max_objects"]:
            problems.append(f"{prefix}.model.architecture.num_queries = {arch['num_queries']} is not allowed: "
                            f"must be >= pretrain.target_copies x data.max_objects ({copies * data['max_objects']})")
        if model["pretrain"]["denoising"]["groups"] and arch["d_model"] % 8:
            problems.append(f"{prefix}.model.architecture.d_model = {arch['d_model']} is not allowed with "
                            "pretrain.denoising.groups > 0: must be divisible by 8 (the denoising queries' sine "
                            "embedding of a box)")
        if arch["ffn_dim"] % raw["mgs"]["group_size"]:
            problems.append(f"mgs.group_size = {raw['mgs']['group_size']} is not allowed: "
                            f"must divide {prefix}.model.architecture.ffn_dim ({arch['ffn_dim']})")
    if raw["mgs"]["single_block_targets"] and "group_activity" not in raw["mgs"]["objectives"]:
        problems.append(f"mgs.single_block_targets = {raw['mgs']['single_block_targets']} is not allowed without "
                        "group_activity in mgs.objectives (the single-block protocol evaluates its gates); use []")
    if raw["benchmark"]["objective"] not in raw["mgs"]["objectives"]:
        problems.append(f"benchmark.objective = {json.dumps(raw['benchmark']['objective'])} is not allowed: must be "
                        f"one of mgs.objectives ({', '.join(raw['mgs']['objectives'])}), whose gate sets it measures")
    gate_budget = cfg["mgs"]
    if data["source"] == "synthetic":
        split_size = data["splits"][gate_budget["cache"]["split"]]
        images = gate_budget["cache"]["images"] or split_size
        if images > split_size:
            problems.append(f"{prefix}.mgs.cache.images = {images} is not allowed: must be <= "
                            f"data.splits.{gate_budget['cache']['split']} ({split_size})")
        elif gate_budget["training"]["batch_size"] > images:
            problems.append(f"{prefix}.mgs.training.batch_size = {gate_budget['training']['batch_size']} is not "
                            f"allowed: must be <= the cached images ({images})")
    return problems


def _coco_data_problems(data: dict[str, Any], prefix: str) -> list[str]:
    """A COCO root is a directory (what it holds is checked on loading a study: `data.coco_root`); the held-out
    val2017 images can hold train + calibration."""
    problems = []
    if data["root"] is not None and not Path(data["root"]).expanduser().is_dir():
        problems.append(f"{prefix}.data.root = {json.dumps(data['root'])} is not allowed: "
                        "no such directory (give an existing COCO root, or null to download)")
    held_out, wanted = data["held_out_from_val"], data["train_images"] + data["calibration_images"]
    if held_out and wanted > held_out:
        problems.append(f"{prefix}.data.held_out_from_val = {held_out} is not allowed: the train and calibration "
                        f"splits are drawn from the held-out val2017 images, so it must be >= train_images + "
                        f"calibration_images ({data['train_images']} + {data['calibration_images']} = {wanted})")
    return problems


def load_config(params_path: str | Path = "params.yaml", study: str | None = None) -> StudyConfig:
    """Read, validate and type params.yaml; `study` overrides the file's `study` key."""
    params_path = Path(params_path)
    if not params_path.is_file():
        raise ConfigError(f"params file {str(params_path)!r} does not exist")
    try:
        raw = yaml.safe_load(params_path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"invalid {params_path.name}: {where}{getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid {params_path.name}: it holds no settings (an empty file, or not a mapping); "
                          f"start from the project's params.yaml")
    if study is not None:
        raw = {**raw, "study": study}
    schema = yaml.safe_load(_schema_path(params_path).read_text())
    validate(raw, schema, params_path.name)
    cfg = raw["studies"][raw["study"]]
    return StudyConfig(
        name=raw["study"],
        seed=raw["seed"],
        experiment=f"{raw['tracking']['experiment_prefix']}-{raw['study']}",
        data=cfg["data"],
        input=InputSize(**cfg["input"]),
        model=cfg["model"],
        evaluate=cfg["evaluate"],
        gate_training=cfg["mgs"],
        raw=raw,
        resources=cfg["resources"],
    )
