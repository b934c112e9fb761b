"""params.yaml validation: the real file loads; every kind of bad value fails early with a readable message."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from detr_sparsity import tracking
from detr_sparsity.cli import load_study
from detr_sparsity.config import ConfigError, InputSize, StudyConfig, load_config
from detr_sparsity.pipeline import stage_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "params.schema.yaml"


def real_params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw[a][b][c] = value for dotted 'a.b.c' (creating nothing: every parent must exist)."""
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value


def write_params(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """params.yaml in tmp_path, with the schema beside it where load_config looks first."""
    schema_dir = tmp_path / "workflow" / "schemas"
    schema_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEMA, schema_dir / SCHEMA.name)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def modified(tmp_path: Path, changes: dict[str, Any]) -> Path:
    raw = copy.deepcopy(real_params())
    for dotted, value in changes.items():
        set_key(raw, dotted, value)
    return write_params(tmp_path, raw)


# ---------------------------------------------------------------------------------------------------------
# The real file


def test_real_params_load_as_synthetic_study():
    cfg = load_config(PARAMS)
    raw = real_params()
    assert isinstance(cfg, StudyConfig)
    assert cfg.name == "synthetic" == raw["study"]
    assert cfg.seed == raw["seed"] and isinstance(cfg.seed, int)
    assert cfg.experiment == f"{raw['tracking']['experiment_prefix']}-synthetic"
    assert isinstance(cfg.input, InputSize)
    assert cfg.input == InputSize(**raw["studies"]["synthetic"]["input"])
    assert isinstance(cfg.input.shortest_edge, int) and isinstance(cfg.input.longest_edge, int)
    assert cfg.data["source"] == "synthetic"
    assert cfg.data["min_objects"] <= cfg.data["max_objects"]
    assert cfg.model["source"] == "pretrain"
    assert isinstance(cfg.model["architecture"]["ffn_dim"], int)
    assert all(isinstance(t, float) and 0 < t < 1 for t in cfg.mgs["targets"])
    assert cfg.evaluate["split"] in ("train", "calibration", "val")
    assert cfg.results_dir == Path("results") / "synthetic"


def test_study_override_selects_coco_block():
    cfg = load_config(PARAMS, study="coco")
    assert cfg.name == "coco"
    assert cfg.data["source"] == "coco" and cfg.model["source"] == "hub"
    assert cfg.input == InputSize(800, 1333)
    assert cfg.experiment.endswith("-coco")


def test_params_hash_tracks_stage_params(tmp_path):
    base = load_config(PARAMS)
    changed = load_config(modified(tmp_path, {"studies.synthetic.evaluate.batch_size": 3}))
    # Only the stages that read the `evaluate` block see a different hash.
    def params_hash(cfg, stage):
        return tracking.params_hash(stage_params(cfg, stage))

    assert params_hash(base, "evaluate") != params_hash(changed, "evaluate")
    assert params_hash(base, "model") == params_hash(changed, "model")
    assert params_hash(base, "data") == params_hash(changed, "data")


def test_copy_of_real_params_in_tmp_loads(tmp_path):
    # The helper itself produces a valid file: errors below come from the change, not from the copy.
    cfg = load_config(write_params(tmp_path, real_params()))
    assert cfg == load_config(PARAMS)


# ---------------------------------------------------------------------------------------------------------
# Bad values: each error names the key path, the bad value and what is allowed

BAD_VALUES = {
    "unknown study": (
        {"study": "nope"},
        ["study", '"nope"', "known studies", "synthetic", "coco"],
    ),
    "target above 1": (
        {"mgs.targets": [0.5, 1.2]},
        ["mgs.targets.1", "1.2", "must be < 1"],
    ),
    "target 0": (
        {"mgs.targets": [0.0, 0.5]},
        ["mgs.targets.0", "0.0", "must be > 0"],
    ),
    "unknown gate objective": (
        {"mgs.objectives": ["task", "l1"]},
        ["mgs.objectives.1", '"l1"', "allowed values: group_activity, task, distillation, oracle"],
    ),
    "group size not dividing the FFN width": (
        {"mgs.group_size": 48},
        ["mgs.group_size = 48", "must divide studies.synthetic.model.architecture.ffn_dim (1024)"],
    ),
    "gate threshold of 1": (
        {"mgs.gate_threshold": 1.0},
        ["mgs.gate_threshold", "1.0", "must be < 1"],
    ),
    "unknown calibration mode": (
        {"mgs.calibration": "per_layer"},
        ["mgs.calibration", '"per_layer"', "allowed values: global, per_block"],
    ),
    "fewer cached images than a training batch": (
        {"studies.synthetic.mgs.cache.images": 8},
        ["studies.synthetic.mgs.training.batch_size = 16 is not allowed", "must be <= the cached images (8)"],
    ),
    "single-block protocol without the layer-local gates": (
        {"mgs.objectives": ["distillation"], "benchmark.objective": "distillation"},
        ["mgs.single_block_targets = [0.85, 0.9, 0.95] is not allowed without group_activity in mgs.objectives"],
    ),
    "gated block that is not an FFN block name": (
        {"mgs.blocks": ["ffn.3"]},
        ["mgs.blocks", '["ffn.3"]', 'allowed: FFN blocks that get a gate ("all", or names such as encoder.0'],
    ),
    "more cached images than the split has": (
        {"studies.synthetic.mgs.cache.images": 9000},
        ["studies.synthetic.mgs.cache.images = 9000", "must be <= data.splits.train (8000)"],
    ),
    "negative count": (
        {"studies.synthetic.data.splits.train": -5},
        ["studies.synthetic.data.splits.train", "-5", "must be >= 0"],
    ),
    "zero val images": (
        {"studies.synthetic.data.splits.val": 0},
        ["studies.synthetic.data.splits.val", "= 0", "must be >= 1"],
    ),
    "coco root missing": (
        {"study": "coco", "studies.coco.data.root": "/no/such/coco/root"},
        ["studies.coco.data.root", '"/no/such/coco/root"', "no such directory"],
    ),
    "local model dir missing": (
        {"study": "coco", "studies.coco.model.name_or_path": "./no/such/dir"},
        ["studies.coco.model.name_or_path", '"./no/such/dir"', "must exist and hold config.json"],
    ),
    "zero shards": (
        {"studies.synthetic.evaluate.shards": 0},
        ["studies.synthetic.evaluate.shards", "0", "must be >= 1"],
    ),
    "unknown key in evaluate": (
        {"studies.synthetic.evaluate.batchsize": 4},
        ["studies.synthetic.evaluate", "unknown key(s) batchsize", "allowed keys: batch_size, front_end_memory_mb, shards, split"],
    ),
    "unknown key in synthetic data": (
        {"studies.synthetic.data.colour": "red"},
        ["studies.synthetic.data", "unknown key(s) colour", "allowed keys:", "min_objects"],
    ),
    "unknown top-level key": (
        {"sed": 1},
        ["<top level>", "unknown key(s) sed",
         "allowed keys: benchmark, bootstrap, masking, mgs, profile, seed, sibs, studies, study, tracking"],
    ),
    "unknown benchmark shape": (
        {"benchmark.shapes": ["study", "detr-r101"]},
        ["benchmark.shapes.1", '"detr-r101"', "allowed values: study, detr-r50"],
    ),
    "benchmark objective without gate sets": (
        {"benchmark.objective": "oracle"},
        ["benchmark.objective", '"oracle"', "must be one of mgs.objectives (group_activity, distillation)"],
    ),
    "zero benchmark repeats": (
        {"benchmark.repeats": 0},
        ["benchmark.repeats = 0", "must be >= 1"],
    ),
    "min_objects > max_objects": (
        {"studies.synthetic.data.min_objects": 5, "studies.synthetic.data.max_objects": 3},
        ["studies.synthetic.data.min_objects", "= 5", "must be <= max_objects (3)"],
    ),
    "pretraining batch larger than the train split": (
        {"studies.synthetic.data.splits.train": 8, "studies.synthetic.model.pretrain.batch_size": 16},
        ["studies.synthetic.model.pretrain.batch_size", "= 16", "must be <= data.splits.train (8)"],
    ),
    "too few queries for one-to-many matching": (
        {"studies.synthetic.model.architecture.num_queries": 20},
        ["studies.synthetic.model.architecture.num_queries", "= 20", "target_copies x data.max_objects (30)"],
    ),
    "denoising queries with a d_model their box embedding cannot split": (
        {"studies.synthetic.model.pretrain.denoising.groups": 2, "studies.synthetic.model.architecture.d_model": 132,
         "studies.synthetic.model.architecture.attention_heads": 4},
        ["studies.synthetic.model.architecture.d_model", "= 132", "must be divisible by 8"],
    ),
    "string for integer": (
        {"studies.synthetic.evaluate.batch_size": "four"},
        ["studies.synthetic.evaluate.batch_size", '"four"', "must be of type integer"],
    ),
    "float seed": (
        {"seed": 1.5},
        ["seed", "1.5", "must be of type integer"],
    ),
    "bad enum": (
        {"studies.synthetic.evaluate.split": "test"},
        ["studies.synthetic.evaluate.split", '"test"', "allowed values: train, calibration, val"],
    ),
    "keep-ratio of zero": (
        {"masking.keep_ratios": [1.0, 0]},
        ["masking.keep_ratios.1", "= 0", "must be > 0"],
    ),
    "keep-ratio above one": (
        {"masking.keep_ratios": [1.5]},
        ["masking.keep_ratios.0", "= 1.5", "must be <= 1"],
    ),
    "unknown masking method": (
        {"masking.methods": ["topk", "bottomk"]},
        ["masking.methods.1", '"bottomk"', "allowed values: topk, random"],
    ),
    "unknown SIBS indicator": (
        {"sibs.indicator": "variance"},
        ["sibs.indicator", '"variance"', "allowed values: firing_frequency, mean_activation"],
    ),
    "negative SIBS threshold": (
        {"sibs.thresholds": [0.0, -0.1]},
        ["sibs.thresholds.1", "-0.1", "must be >= 0"],
    ),
    "too many classes": (
        {"studies.synthetic.data.num_classes": 9},
        ["studies.synthetic.data.num_classes", "9", "must be <= 8"],
    ),
}


@pytest.mark.parametrize("changes, expected", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_raises_config_error_naming_key_value_and_rule(tmp_path, monkeypatch, changes, expected):
    monkeypatch.chdir(tmp_path)  # relative paths (./no/such/dir) are resolved against the working directory
    path = modified(tmp_path, changes)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.startswith("invalid params.yaml")
    for part in expected:
        assert part in message, f"{part!r} not in message:\n{message}"


def test_existing_coco_root_and_local_model_dir_are_accepted(tmp_path, monkeypatch):
    # The counterpart of the two missing-path cases: the same keys pointing at real directories pass.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco/annotations").mkdir(parents=True)  # the least a root holds: val2017 and its annotations
    (tmp_path / "coco/annotations/instances_val2017.json").write_text("{}")
    (tmp_path / "coco/val2017").mkdir()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = load_config(modified(tmp_path, {"study": "coco", "studies.coco.data.root": str(tmp_path / "coco"),
                                          "studies.coco.model.name_or_path": "./model"}))
    assert cfg.name == "coco" and cfg.model["name_or_path"] == "./model"


def test_local_model_dir_without_config_json_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=r"studies\.coco\.model\.name_or_path = \"\./model\""):
        load_config(modified(tmp_path, {"study": "coco", "studies.coco.model.name_or_path": "./model"}))


def coco_root(root: Path, *parts: str) -> Path:
    """A directory holding the given parts of the COCO 2017 layout (empty files and folders)."""
    for part in parts:
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).write_text("{}") if part.endswith(".json") else (root / part).mkdir()
    return root


VAL = ("annotations/instances_val2017.json", "val2017")
TRAIN = ("annotations/instances_train2017.json", "train2017")
FETCHED = "train2017 images fetched one by one from base_url (annotations: {annotations})"


@pytest.mark.parametrize("parts, held_out, layout, train", [
    (VAL + TRAIN, 0, "full", "{root}/train2017 as is"),
    (VAL + TRAIN[:1], 0, "val + train annotations",
     FETCHED.format(annotations="{root}/annotations/instances_train2017.json")),
    (VAL, 0, "val-only", FETCHED.format(annotations="instances_train2017.json from annotations_trainval2017.zip, "
                                                    "downloaded")),
    (VAL + TRAIN[1:], 3000, "val-only", "3000 val2017 images held out of the evaluation"),
], ids=["full", "val + train annotations", "val-only", "val-only, held out"])
def test_validate_says_which_layout_a_coco_root_has(tmp_path, capsys, parts, held_out, layout, train):
    from detr_sparsity.cli import main

    root = coco_root(tmp_path / "coco", *parts)
    path = modified(tmp_path, {"study": "coco", "studies.coco.data.root": str(root),
                               "studies.coco.data.held_out_from_val": held_out})
    assert main(["--params", str(path), "validate"]) == 0
    assert capsys.readouterr().out == (
        "params.yaml is valid; study 'coco'\n"
        f"COCO root {root}: {layout} layout; evaluation on {root}/val2017 in place; train and calibration images: "
        f"{train.format(root=root)}\n")


@pytest.mark.parametrize("parts, missing, found", [
    ((), "annotations/instances_val2017.json, val2017/", "none of the COCO layout"),
    (VAL[1:] + TRAIN, "annotations/instances_val2017.json",
     "val2017/, annotations/instances_train2017.json, train2017/"),
])
def test_a_coco_root_without_val2017_is_refused_saying_what_is_missing(tmp_path, parts, missing, found):
    root = coco_root(tmp_path / "coco", *parts)
    root.mkdir(exist_ok=True)
    with pytest.raises(ConfigError) as excinfo:  # what a root holds is checked on loading a study
        load_study(modified(tmp_path, {"study": "coco", "studies.coco.data.root": str(root)}))
    assert str(excinfo.value) == (
        f"invalid params.yaml:\n  studies.coco.data.root = \"{root}\" is not allowed: {root} lacks {missing} (found: "
        f"{found}); a COCO root needs at least annotations/instances_val2017.json and val2017/ (val-only), and "
        "annotations/instances_train2017.json and train2017/ too for the full layout")


def test_held_out_val_images_must_hold_the_train_and_calibration_splits(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(modified(tmp_path, {"study": "coco", "studies.coco.data.held_out_from_val": 1000}))
    assert str(excinfo.value) == (
        "invalid params.yaml:\n  studies.coco.data.held_out_from_val = 1000 is not allowed: the train and calibration "
        "splits are drawn from the held-out val2017 images, so it must be >= train_images + calibration_images "
        "(2000 + 500 = 2500)")


def test_every_schema_violation_is_reported_at_once(tmp_path):
    path = modified(tmp_path, {"studies.synthetic.data.splits.train": -5, "mgs.targets": [1.2]})
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert "studies.synthetic.data.splits.train = -5" in message
    assert "mgs.targets.0 = 1.2" in message


def test_missing_required_key_is_named(tmp_path):
    raw = real_params()
    del raw["mgs"]["group_size"]
    with pytest.raises(ConfigError, match=r"^invalid params.yaml:\n  mgs: missing key\(s\) group_size"):
        load_config(write_params(tmp_path, raw))


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------------------
# CLI


def run_cli(params: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detr_sparsity", "--params", str(params), "validate"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_validate_rejects_bad_file_with_exit_code_2(tmp_path):
    path = modified(tmp_path, {"mgs.targets": [0.5, 1.2]})
    result = run_cli(path, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: invalid params.yaml" in result.stderr
    assert "mgs.targets.1 = 1.2 is not allowed: must be < 1" in result.stderr
    assert "is valid" not in result.stdout


def test_cli_validate_accepts_real_file(tmp_path):
    result = run_cli(PARAMS, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "params.yaml is valid; study 'synthetic'" in result.stdout


@pytest.mark.parametrize("changes, expected", [
    ({"mgs.targets": [0.5, 1.2]}, "error: invalid variant.yaml:\n  mgs.targets.1 = 1.2 is not allowed"),
    ({"studies.synthetic.resources.evaluation": {"gpu": 1}},
     "error: invalid variant.yaml:\n  studies.synthetic.resources: unknown key(s) evaluation"),
    ({"study": "coco", "studies.coco.data.root": "no/such/root"},
     "error: invalid variant.yaml:\n  studies.coco.data.root = \"no/such/root\" is not allowed"),
    ({}, None),
], ids=["schema", "resources", "data root", "valid"])
def test_a_settings_file_of_another_name_is_named_in_what_validate_says(tmp_path, changes, expected):
    """`--params variant.yaml`: its problems, and its being valid, are reported under its own name."""
    path = modified(tmp_path, changes).rename(tmp_path / "variant.yaml")
    result = run_cli(path, tmp_path)
    if expected is None:
        assert result.returncode == 0 and result.stdout.startswith("variant.yaml is valid; study 'synthetic'"), \
            result.stderr
    else:
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "params.yaml" not in result.stderr


def test_job_resources_merge_the_stage_entry_over_the_default():
    cfg = load_config(PARAMS, study="coco")
    raw = real_params()["studies"]["coco"]["resources"]
    assert cfg.job_resources("mgs_train") == {**raw["default"], **raw["mgs_train"]}
    assert "gpu" not in cfg.job_resources("data")  # gpu 0 is left out: the job asks for none
    assert "gpu" not in cfg.job_resources("benchmark")  # times the CPU kernels


def test_a_study_without_resources_is_refused(tmp_path):
    raw = copy.deepcopy(real_params())
    del raw["studies"]["synthetic"]["resources"]
    with pytest.raises(ConfigError, match=re.escape("studies.synthetic: missing key(s) resources")):
        load_config(write_params(tmp_path, raw))


@pytest.mark.parametrize("changes, expected", [
    ({"studies.synthetic.resources.evaluation": {"gpu": 1}},
     "studies.synthetic.resources: unknown key(s) evaluation; allowed keys: default, data, model, evaluate"),
    ({"studies.synthetic.resources.evaluate": {"gpu": -1}}, "studies.synthetic.resources.evaluate.gpu = -1"),
    ({"studies.synthetic.resources.evaluate": {"mem_gb": 4}}, "unknown key(s) mem_gb"),
])
def test_bad_resources_are_rejected(tmp_path, changes, expected):
    # Resource entries name stages: the pipeline's declaration knows them, so they are checked on loading a study.
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_study(modified(tmp_path, changes))


# ---------------------------------------------------------------------------------------------------------
# The schema: it describes, params.yaml holds the values

# The JSON Schema keywords the project's schema uses. The meta-schema accepts any other keyword, so a stray block
# (settings indented under the wrong key) or a misspelt keyword would be ignored silently: this list catches it.
VOCABULARY = {"$schema", "$defs", "$ref", "description", "type", "properties", "additionalProperties", "required",
              "items", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems",
              "uniqueItems", "minLength", "minProperties", "pattern", "oneOf", "allOf", "if", "then"}


def schema_keywords(node, at="") -> list[tuple[str, str]]:
    """(where, keyword) of every schema keyword, walking into subschemas only (property names are not keywords)."""
    found = []
    if not isinstance(node, dict):
        return found
    for key, value in node.items():
        found.append((at, key))
        if key in ("properties", "$defs"):
            for name, sub in value.items():
                found += schema_keywords(sub, f"{at}/{key}/{name}")
        elif key in ("items", "additionalProperties", "if", "then") and isinstance(value, dict):
            found += schema_keywords(value, f"{at}/{key}")
        elif key in ("allOf", "oneOf"):
            for i, sub in enumerate(value):
                found += schema_keywords(sub, f"{at}/{key}/{i}")
    return found


def test_the_schema_uses_only_known_keywords_and_holds_no_defaults():
    schema = yaml.safe_load(SCHEMA.read_text())
    unknown = [(at, key) for at, key in schema_keywords(schema) if key not in VOCABULARY]
    assert unknown == []
    # One source of values: params.yaml. The walk itself must see what it is meant to catch.
    assert ("/properties/seed", "description") in schema_keywords(schema)
    stray = {"properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}, "c": {"type": "integer"}}}}
    assert ("/properties/a", "c") in schema_keywords(stray)


def test_a_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write_params(tmp_path, real_params())
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ": x"  # "a: b: x": mapping values are not allowed here
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"^invalid params.yaml: line 4, column \d+: "):
        load_config(path)
    done = subprocess.run([sys.executable, "-m", "detr_sparsity", "--params", str(path), "validate"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: invalid params.yaml: line 4, column ")
    assert "Traceback" not in done.stderr


def test_an_empty_params_file_is_one_message(tmp_path):
    path = write_params(tmp_path, real_params())
    path.write_text("")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).count("\n") == 0 and "holds no settings" in str(refused.value)
