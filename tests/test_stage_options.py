"""Settings that no other test runs through their stage, each run once by the real stage on the tiny synthetic study
(data and model made by the real stages, without MLflow, as in test_threshold_policy), and checked against an
independent recount from the model's own activations:

- `sibs.indicator: mean_activation`: the thresholds are in activation units, so the kept neurons are those whose mean
  post-ReLU activation over the profiling split's real tokens, recounted here, is at least tau;
- `mgs.blocks` as a list: only the listed block gets a gate, through mgs_local, mgs_calibrate and mgs_evaluate;
- `mgs.gate_threshold` other than 0.5: the saved gates open a group where sigmoid(W x + b) > 0.7, recounted here;
- the `oracle` objective through mgs_train and mgs_calibrate: its first step's loss has a closed form (fresh gates
  open every group).

And the benchmark's speed.json on the same study, at its shapes and DETR-R50's: every row's sparsity and FLOPs
speed-up recounted from the shapes, the gates and the activations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.mgs.gates import gate_metadata, load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.ffn import ffn_blocks
from detr_sparsity.stages import mgs_cache as mgs_cache_stage
from detr_sparsity.stages import mgs_calibrate as mgs_calibrate_stage
from detr_sparsity.stages import mgs_evaluate as mgs_evaluate_stage
from detr_sparsity.stages import mgs_local as mgs_local_stage
from detr_sparsity.stages import mgs_train as mgs_train_stage
from detr_sparsity.stages import profile as profile_stage
from detr_sparsity.stages import sibs as sibs_stage
from tiny_project import TINY, TINY_SWEEPS, Untracked, tiny_params, untracked_study

ARCH = TINY["model"]["architecture"]
D, H, G = ARCH["d_model"], ARCH["ffn_dim"], TINY_SWEEPS["mgs"]["group_size"]
GATE_THRESHOLD = 0.7
GATED = ["decoder.0"]  # mgs.blocks: the second block only (not a prefix of the model's blocks)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study with the options under test, its data, model, profile and gate-training caches made by the real
    stages."""
    work = tmp_path_factory.mktemp("options")
    params = tiny_params()
    params.update(copy.deepcopy(TINY_SWEEPS))
    params["sibs"]["indicator"] = "mean_activation"
    params["mgs"].update({"objectives": ["group_activity", "oracle"], "blocks": GATED,
                          "gate_threshold": GATE_THRESHOLD, "single_block_targets": []})
    params["benchmark"]["objective"] = "group_activity"
    cfg = untracked_study(work, params)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        profile_stage.run_stage(cfg, Untracked(), model=work / "model", data=work / "data",
                                profile=work / "profile.json", neurons=work / "neurons.safetensors")
        mgs_cache_stage.run_stage(cfg, Untracked(), model=work / "model", data=work / "data",
                                  out=work / "cache.safetensors", block_inputs=work / "block_inputs.safetensors")
    return cfg, work


def with_mgs(cfg, **changes):
    """`cfg` with some mgs settings changed (and the study's gate-training budget's `training` section)."""
    training = changes.pop("training", {})
    raw = copy.deepcopy(cfg.raw)
    raw["mgs"].update(changes)
    budget = copy.deepcopy(cfg.gate_training)
    budget["training"].update(training)
    return dataclasses.replace(cfg, raw=raw, gate_training=budget)


# ---------------------------------------------------------------- recounts from the plain model

def real_token_rows(model, batch, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """(real tokens, width): the rows of a block's (images, tokens, width) tensor on real tokens (the backbone's
    own mask for the encoder; every query for the decoder)."""
    if name.startswith("decoder"):
        return tensor.reshape(-1, tensor.shape[-1])
    _features, mask = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])[-1]
    return tensor[mask.flatten(1).bool()]


@torch.no_grad()
def block_tensors(model, loader, what: str) -> dict[str, torch.Tensor]:
    """Per block, over every batch of `loader`, on real tokens: the block's input (`input`) or its post-ReLU
    activations (`activations`), from hooks on the plain model."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in ffn_blocks(model)}
    for batch in loader:
        seen, handles = {}, []
        for name, block in ffn_blocks(model).items():
            if what == "input":
                handles.append(block.register_forward_pre_hook(
                    lambda _m, args, name=name: seen.__setitem__(name, args[0])))
            else:
                handles.append(block.fc1.register_forward_hook(
                    lambda _m, _i, out, name=name: seen.__setitem__(name, torch.relu(out))))
        model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        for handle in handles:
            handle.remove()
        for name, tensor in seen.items():
            found[name].append(real_token_rows(model, batch, name, tensor).double())
    return {name: torch.cat(parts) for name, parts in found.items()}


def mean_activations(cfg, work) -> dict[str, torch.Tensor]:
    """Each neuron's mean post-ReLU activation over the real tokens of the profiling split, recounted."""
    model = load_detr(work / "model").eval()
    split = evaluation_split(cfg, work / "data", cfg.profile["split"], scored=False)
    return {name: acts.mean(0) for name, acts in block_tensors(model, split.loader, "activations").items()}


def gate_recount(cfg, work, split: str, gates_path: Path, threshold: float) -> dict[str, tuple[float, int, int]]:
    """Per gated block: its induced sparsity 1 - open groups / (tokens x groups), recounted from the gate's weights
    as sigmoid(W x + b) > threshold on the block's input (the gated blocks before it are none here: only the last
    block is gated); with the slots counted and those whose probability lies within 1e-4 of the threshold."""
    model = load_detr(work / "model").eval()
    loader = evaluation_split(cfg, work / "data", split, scored=False).loader
    inputs = block_tensors(model, loader, "input")
    found = {}
    for name, gate in load_gates(gates_path).items():
        p = torch.sigmoid(inputs[name] @ gate.gate.weight.detach().double().T + gate.gate.bias.detach().double())
        found[name] = (1.0 - float((p > threshold).double().mean()), p.numel(),
                       int(((p - threshold).abs() < 1e-4).sum()))
    return found


# ---------------------------------------------------------------- sibs.indicator: mean_activation

def test_sibs_with_mean_activation_keeps_the_neurons_whose_mean_activation_reaches_tau(study, tmp_path,
                                                                                     monkeypatch):
    cfg, work = study
    monkeypatch.chdir(work)
    means = mean_activations(cfg, work)
    # tau in activation units, in the widest gap between neighbouring neurons' means in the middle of the range
    values = torch.cat(list(means.values())).sort().values
    middle = range(len(values) // 4, 3 * len(values) // 4)
    i = max(middle, key=lambda j: float(values[j + 1] - values[j]))
    tau = float((values[i] + values[i + 1]) / 2)
    assert float(values[i + 1] - values[i]) > 1e-4 * tau, "a gap no rounding of the profile's sums can cross"
    kept = {name: int((m >= tau).sum()) for name, m in means.items()}
    assert all(0 < k < H for k in kept.values()), kept
    row_path = tmp_path / "row.json"
    sibs_stage.run_stage(cfg, Untracked(), threshold=tau, model=work / "model", data=work / "data",
                         neurons=work / "neurons.safetensors", detections=tmp_path / "detections", row=row_path)
    row = json.loads(row_path.read_text())
    assert row["setting"] == {"indicator": "mean_activation", "threshold": tau}
    assert row["shrunk_ffn"]["kept_neurons"] == kept
    assert row["shrunk_ffn"]["parameters_removed"] == sum((H - k) * (2 * D + 1) for k in kept.values())
    # a static mask: every token keeps the same kept neurons, so each block's induced sparsity is 1 - kept / H
    assert row["induced_sparsity"]["per_block"] == {name: pytest.approx(1 - k / H, abs=1e-12)
                                                    for name, k in kept.items()}
    # the indicator matters: firing frequencies (in [0, 1]) at the same tau would keep other counts
    profile = json.loads((work / "profile.json").read_text())
    assert profile["split"] == cfg.profile["split"]
    from detr_sparsity.sparsity.profile import load_indicator
    firing = load_indicator(work / "neurons.safetensors", "firing_frequency")
    assert {name: int((f >= tau).sum()) for name, f in firing.items()} != kept


# ---------------------------------------------------------------- mgs.blocks as a list, gate_threshold 0.7

def test_a_block_list_gates_only_its_blocks_at_the_configured_threshold(study, tmp_path, monkeypatch):
    """mgs_local trains the listed block's gate alone; mgs_calibrate calibrates it (group_activity) at threshold 0.7;
    mgs_evaluate leaves the other block dense."""
    cfg, work = study
    monkeypatch.chdir(work)
    assert cfg.mgs["blocks"] == GATED and cfg.mgs["gate_threshold"] == GATE_THRESHOLD
    local, gates, training = tmp_path / "local.safetensors", tmp_path / "gates.safetensors", tmp_path / "training.json"
    mgs_local_stage.run_stage(cfg, Untracked(), model=work / "model", block_inputs=work / "block_inputs.safetensors",
                              gates=local, training=tmp_path / "local.json")
    assert gate_metadata(local)["blocks"] == {"decoder.0": [D, H]} and gate_metadata(local)["threshold"] == 0.7
    assert set(json.loads((tmp_path / "local.json").read_text())["blocks"]) == set(GATED)  # per-block metrics
    target = 0.5
    mgs_calibrate_stage.run_stage(cfg, Untracked(), objective="group_activity", target=target, model=work / "model",
                                  data=work / "data", local=local, trained=tmp_path / "absent", gates=gates,
                                  training=training)
    record = json.loads(training.read_text())
    assert record["blocks"] == GATED and record["gate_threshold"] == 0.7 and record["final"] is None
    assert set(load_gates(gates)) == {"decoder.0"} and gate_metadata(gates)["threshold"] == 0.7
    # the calibrated sparsity, recounted on the calibration split with the saved weights at threshold 0.7
    sparsity, slots, near = gate_recount(cfg, work, "calibration", gates, 0.7)["decoder.0"]
    assert abs(sparsity - record["calibration"]["sparsity_after"]) <= near / slots + 1e-12
    assert slots == TINY["data"]["splits"]["calibration"] * ARCH["num_queries"] * (H // G)
    at_half, _, _ = gate_recount(cfg, work, "calibration", gates, 0.5)["decoder.0"]
    assert abs(at_half - sparsity) > near / slots, "0.5 would have opened other groups: the threshold matters"

    row_path = tmp_path / "row.json"
    mgs_evaluate_stage.run_stage(cfg, Untracked(), objective="group_activity", target=target, model=work / "model",
                                 data=work / "data", gates=gates, training=training,
                                 detections=tmp_path / "detections", row=row_path)
    row = json.loads(row_path.read_text())
    assert row["setting"]["blocks"] == GATED and row["setting"]["gate_threshold"] == 0.7
    assert row["induced_sparsity"]["per_block"]["encoder.0"] == 0.0  # not listed: dense
    evaluated, slots, near = gate_recount(cfg, work, cfg.evaluate["split"], gates, 0.7)["decoder.0"]
    assert evaluated > 0
    assert abs(row["induced_sparsity"]["per_block"]["decoder.0"] - evaluated) <= near / slots + 1e-12


# ---------------------------------------------------------------- the oracle objective through mgs_train

def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_the_oracle_objective_trains_through_mgs_train(study, tmp_path, monkeypatch):
    """Fresh gates (no warm start) have W = 0, b = 2: p = 0.88 > 0.7 opens every group, whatever the input. The
    first step's oracle loss is then the weighted BCE of logit 2 against `keep` positives of `groups`, with
    positives weighted (groups - keep) / keep: per token (groups - keep) / groups x (softplus(-2) + softplus(2)).
    mgs_train trains once toward mgs.train_target; mgs_calibrate calibrates those gates to another target."""
    cfg, work = study
    monkeypatch.chdir(work)
    train_target, target = 0.7, 0.5
    cfg = with_mgs(cfg, train_target=train_target, training={"warm_start": False})
    trained = tmp_path / "trained"
    mgs_train_stage.run_stage(cfg, Untracked(), model=work / "model", cache=work / "cache.safetensors",
                              local=tmp_path / "absent", out=trained)
    assert sorted(p.name for p in trained.iterdir()) == ["oracle.json", "oracle.safetensors"]  # not group_activity
    record = json.loads((trained / "oracle.json").read_text())
    assert record["objective"] == "oracle" and record["target"] == train_target
    assert record["blocks"] == GATED and record["local"] is None
    steps = TINY["mgs"]["training"]["steps"]
    curve = record["curve"]
    assert [p["step"] for p in curve] == list(range(1, steps + 1)) and record["final"]["steps"] == steps
    groups = H // G
    keep = max(1, round((1 - train_target) * groups))  # 0.3 x 4 groups: 1
    assert (groups, keep) == (4, 1)
    first = (groups - keep) / groups * (softplus(-2.0) + softplus(2.0))
    assert curve[0]["objective_loss"] == pytest.approx(first, rel=1e-5)
    assert curve[0]["induced_sparsity"] == 0.0 and "induced_sparsity.encoder.0" not in curve[0]
    # the budget falls from 1 to 1 - 0.7 over the first half of the 4 steps
    assert [p["budget"] for p in curve] == pytest.approx([1.0, 0.65, 0.3, 0.3])
    as_trained = load_gates(trained / "oracle.safetensors")
    assert set(as_trained) == {"decoder.0"} and as_trained["decoder.0"].gate.weight.abs().sum() > 0

    gates, training = tmp_path / "gates.safetensors", tmp_path / "training.json"
    mgs_calibrate_stage.run_stage(cfg, Untracked(), objective="oracle", target=target, model=work / "model",
                                  data=work / "data", local=tmp_path / "absent", trained=trained, gates=gates,
                                  training=training)
    calibrated = json.loads(training.read_text())
    assert (calibrated["objective"], calibrated["target"], calibrated["trained_target"]) == ("oracle", target,
                                                                                             train_target)
    assert calibrated["final"] == record["final"] and calibrated["local"] is None
    assert gate_metadata(gates)["info"]["objective"] == "oracle"
    # calibration moves only the bias, by one offset: the trained weights are kept
    calibrated_gate, trained_gate = load_gates(gates)["decoder.0"].gate, as_trained["decoder.0"].gate
    assert torch.equal(calibrated_gate.weight, trained_gate.weight)
    offset = trained_gate.bias - calibrated_gate.bias
    assert torch.allclose(offset, offset[0].expand_as(offset))
    assert float(offset[0]) == pytest.approx(calibrated["calibration"]["offset"], abs=1e-5)
    sparsity, slots, near = gate_recount(cfg, work, "calibration", gates, 0.7)["decoder.0"]
    assert abs(sparsity - calibrated["calibration"]["sparsity_after"]) <= near / slots + 1e-12


# ---------------------------------------------------------------- the benchmark's speed.json at both shapes

@pytest.fixture(scope="module")
def every_block_gates(study, tmp_path_factory):
    """group_activity gates on every block (mgs.blocks: all) at target 0.5, threshold 0.7, by the real stages."""
    cfg, work = study
    cfg = with_mgs(cfg, blocks="all")
    out = tmp_path_factory.mktemp("every-block")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mgs_local_stage.run_stage(cfg, Untracked(), model=work / "model",
                                  block_inputs=work / "block_inputs.safetensors", gates=out / "local.safetensors",
                                  training=out / "local.json")
        mgs_calibrate_stage.run_stage(cfg, Untracked(), objective="group_activity", target=0.5, model=work / "model",
                                      data=work / "data", local=out / "local.safetensors", trained=out / "absent",
                                      gates=out / "gates.safetensors", training=out / "training.json")
    return cfg, out / "gates.safetensors"


def test_speed_json_at_both_shapes_recounts_its_flops_from_the_shapes(study, every_block_gates, monkeypatch):
    """run_benchmark on the tiny study and on DETR-R50's shapes (10 encoder tokens per block instead of 850; the
    end-to-end R50 model on one 64 x 96 image: 2 x 3 = 6 encoder tokens, 100 queries). Every row's sparsity and FLOPs
    speed-up recounted: SIBS from the mean activations recounted here, MGS from the gates' decisions on the study's
    first evaluation batch; FLOPs 2 x tokens x d x H per linear layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from detr_sparsity.execution import benchmark

    cfg, work = study
    cfg, gates = every_block_gates
    monkeypatch.chdir(work)
    monkeypatch.setitem(benchmark.R50, "encoder_tokens", 10)
    settings = {**cfg.benchmark, "shapes": ["study", "detr-r50"], "detr_r50_input": {"height": 64, "width": 96}}
    result = benchmark.run_benchmark(cfg, work / "model", work / "data", work / "neurons.safetensors",
                                     {"0.5": gates}, settings)
    thresholds = [str(t) for t in cfg.sibs["thresholds"]]
    assert thresholds == ["0.0", "0.2"]
    settings_measured = [("mgs", "0.5", "group_activity"), *(("sibs", t, None) for t in thresholds)]
    assert sorted((r["shape"], r["scope"], r["method"], r["setting"], str(r["objective"])) for r in result["rows"]) \
        == sorted((shape, scope, m, s, str(o)) for shape in ("study", "detr-r50")
                  for scope in ("encoder", "decoder", "model") for m, s, o in settings_measured)
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["speedup"] == row["dense_ms"] / row["sparse_ms"] and row["gain"] == (row["speedup"] > 1.0)
        assert row["fraction_of_theoretical"] == pytest.approx(row["speedup"] / row["flops_speedup"])
    rows = {(r["shape"], r["scope"], r["method"], r["setting"]): r for r in result["rows"]}

    # tokens per block: the study's first evaluation batch (all of its positions), and R50's
    model = load_detr(work / "model").eval()
    batch = next(iter(evaluation_split(cfg, work / "data", scored=False).loader))
    images = batch["pixel_values"].shape[0]
    assert images == cfg.evaluate["batch_size"]
    _features, mask = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])[-1]
    tokens = {"encoder": mask.numel(), "decoder": images * ARCH["num_queries"]}
    assert result["block_tokens"] == {"study": tokens, "detr-r50": {"encoder": 10, "decoder": 100}}
    assert result["model_inputs"]["study"] == {"images": images, "height": 64, "width": 64}
    assert result["model_inputs"]["detr-r50"]["encoder_tokens"] == 6

    # SIBS, from the mean activations: block rows, each kind one block of the study and six of R50
    means = mean_activations(cfg, work)
    assert all(float((m - 0.2).abs().min()) > 1e-6 for m in means.values()), "no mean at tau 0.2 itself"
    for threshold in thresholds:
        kept = {name: int((m >= float(threshold)).sum()) for name, m in means.items()}
        r50_kept = {name: round(2048 * k / H) for name, k in kept.items()}  # R50 blocks keep the same share
        for kind in ("encoder", "decoder"):
            (name,) = [n for n in kept if n.startswith(kind)]
            study_row, r50_row = rows[("study", kind, "sibs", threshold)], rows[("detr-r50", kind, "sibs", threshold)]
            assert study_row["induced_sparsity"] == pytest.approx(1 - kept[name] / H)
            assert study_row["flops_speedup"] == pytest.approx(H / kept[name])  # 2 tokens d H over 2 tokens d kept
            shrunk_flops = 2 * (2 * tokens[kind] * D * kept[name])
            assert study_row["sparse_gflops"] == pytest.approx(shrunk_flops / (study_row["sparse_ms"] * 1e6))
            assert r50_row["induced_sparsity"] == pytest.approx(1 - r50_kept[name] / 2048)
            assert r50_row["flops_speedup"] == pytest.approx(2048 / r50_kept[name])
    assert rows[("study", "model", "sibs", "0.0")]["flops_speedup"] == 1.0  # mean activations are >= 0: all kept

    # MGS on the study's shapes: the gates' decisions (threshold 0.7) on each block's dense input of that batch
    inputs = block_tensors(model, [batch], "input")
    opened = {}
    for name, gate in load_gates(gates).items():
        assert gate.threshold == 0.7 and gate.group_size == G
        p = torch.sigmoid(inputs[name] @ gate.gate.weight.detach().double().T + gate.gate.bias.detach().double())
        assert float((p - 0.7).abs().min()) > 1e-5, "no decision within rounding of the threshold"
        opened[name] = int((p > 0.7).sum())
    n = {name: tokens[name.split(".")[0]] for name in opened}
    for kind in ("encoder", "decoder"):
        (name,) = [b for b in opened if b.startswith(kind)]
        found = rows[("study", kind, "mgs", "0.5")]
        dense = 2 * (2 * n[name] * D * H)
        sparse = 2 * (2 * opened[name] * G * D) + 2 * n[name] * D * (H // G)
        assert found["flops_speedup"] == pytest.approx(dense / sparse)
        assert found["induced_sparsity"] == pytest.approx(1 - opened[name] * G / (n[name] * H))
        # FLOPs per second: 2 per MAC, the gate's included, over the measured time
        assert found["sparse_gflops"] == pytest.approx(sparse / (found["sparse_ms"] * 1e6))
        assert found["dense_gflops"] == pytest.approx(dense / (found["dense_ms"] * 1e6))
    # against the machine's dense throughput measured in the same run; end-to-end rows have their Amdahl ceiling
    peak = result["machine_dense_gflops"]
    assert peak["matmul"] == 1024 and peak["threads"] == settings["threads"] and peak["gflops"] > 0
    for row in result["rows"]:
        if row["scope"] == "model":
            assert "fraction_of_machine" not in row
        else:
            assert row["fraction_of_machine"] == pytest.approx(row["sparse_gflops"] / peak["gflops"])

    # End to end: the FFN FLOPs by hand, and as FlopCounterMode counts them module by module
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    counted_ffn = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
                      if module.endswith(".mlp"))
    ffn = {"study": 2 * sum(2 * n[b] * D * H for b in n), "detr-r50": 6 * 2 * 2 * (6 + 100) * 256 * 2048}
    assert counted_ffn == ffn["study"]
    gate_flops = {shape: ffn[shape] / (2 * G) for shape in ffn}  # 2 tokens d H / G per block: FFN FLOPs / 2G
    for shape in ("study", "detr-r50"):
        share = result["ffn_share"][shape]
        assert 0 < share < 1 and result["amdahl_ceiling"][shape] == pytest.approx(1 / (1 - share))
        for method, setting in (("mgs", "0.5"), *(("sibs", t) for t in thresholds)):
            found = rows[(shape, "model", method, setting)]
            total, s = found["model_flops_dense"], found["induced_sparsity"]
            assert found["ffn_flops_dense"] == ffn[shape] and total > ffn[shape]
            sparse = total - ffn[shape] * s + (gate_flops[shape] if method == "mgs" else 0)
            assert found["flops_speedup"] == pytest.approx(total / sparse)
            assert found["amdahl_ceiling_at_sparsity"] == pytest.approx(1 / ((1 - share) + share * (1 - s)))
        # R50 blocks: the sparsity of the sampled masks, and FLOPs from it (H = 2048, G = 16, d cancels out)
        if shape == "detr-r50":
            for kind in ("encoder", "decoder"):
                found = rows[(shape, kind, "mgs", "0.5")]
                assert found["flops_speedup"] == pytest.approx(1 / ((1 - found["induced_sparsity"]) + 1 / (2 * G)))
    assert counter.get_total_flops() == rows[("study", "model", "mgs", "0.5")]["model_flops_dense"]
    study_mgs = rows[("study", "model", "mgs", "0.5")]
    assert study_mgs["induced_sparsity"] == pytest.approx(
        1 - sum(opened.values()) * G / sum(n[b] * H for b in n))


def test_the_benchmark_measures_a_gate_set_on_listed_blocks_only(study, tmp_path, monkeypatch):
    """With only decoder.0 gated, the encoder has no MGS rows and runs dense end to end: the model row's kept
    slots are the decoder's kept slots plus every encoder slot, and its gate cost is the decoder gate's alone."""
    from detr_sparsity.execution import benchmark

    cfg, work = study
    monkeypatch.chdir(work)
    local, gates = tmp_path / "local.safetensors", tmp_path / "gates.safetensors"
    mgs_local_stage.run_stage(cfg, Untracked(), model=work / "model", block_inputs=work / "block_inputs.safetensors",
                              gates=local, training=tmp_path / "local.json")
    mgs_calibrate_stage.run_stage(cfg, Untracked(), objective="group_activity", target=0.5, model=work / "model",
                                  data=work / "data", local=local, trained=tmp_path / "absent", gates=gates,
                                  training=tmp_path / "training.json")
    result = benchmark.run_benchmark(cfg, work / "model", work / "data", work / "neurons.safetensors",
                                     {"0.5": gates}, {**cfg.benchmark, "shapes": ["study"], "repeats": 1,
                                                      "model_repeats": 1, "warmup": 0})
    mgs = {r["scope"]: r for r in result["rows"] if r["method"] == "mgs"}
    assert set(mgs) == {"decoder", "model"}
    assert {r["scope"] for r in result["rows"] if r["method"] == "sibs"} == {"encoder", "decoder", "model"}
    decoder, model = mgs["decoder"], mgs["model"]
    assert decoder["blocks"] == GATED and 0 < decoder["induced_sparsity"] < 1
    # slots per kind from the block rows' token counts (every block of a kind sees the same tokens)
    sibs = {r["scope"]: r for r in result["rows"] if r["method"] == "sibs" and r["scope"] != "model"}
    slots = {kind: sibs[kind]["tokens_per_block"] * H * len(sibs[kind]["blocks"]) for kind in ("encoder", "decoder")}
    expected = decoder["induced_sparsity"] * slots["decoder"] / (slots["encoder"] + slots["decoder"])
    assert model["induced_sparsity"] == pytest.approx(expected, rel=1e-12)
