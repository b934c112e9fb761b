"""Measured speed of sparse FFN execution (the library of stage `benchmark`): dense vs SIBS (shrunk FFN) vs MGS (sparse group
kernel) per FFN block kind and end to end, at the study's shapes and at DETR-R50's.

Every figure is a median over `repeats` timed calls after `warmup` untimed ones. Within one (shape, scope)
every variant (dense, each SIBS threshold, each MGS target sparse and masked) runs once per repeat, in an
order rotated every repeat, so dense and sparse are measured side by side in the same run and drift in the
machine's speed (other jobs on a shared machine) hits all of them alike.

What is timed:
- scope encoder / decoder: the FFN blocks of that kind, one after another, on their own inputs. Dense is
  fc2(relu(fc1 x)); SIBS the shrunk fc1/fc2; MGS the gate (W_g x + b_g, decision) plus the sparse kernel,
  so the gate's cost is paid; `masked_ms` is the study's masked dense computation (gate, fc1, mask, fc2).
- scope model: a whole forward pass of the detector on one batch (no post-processing).
Inputs and masks:
- study: the study's model on the first evaluation batch (real images); the FFN inputs are captured from
  the dense forward, MGS masks are the trained gates' decisions on them, SIBS keeps come from the profile.
- detr-r50: d 256, H 2048, 6 + 6 blocks, one image: 850 encoder tokens (800 x 1066 input), 100 queries.
  Weights are random (seeded); inputs standard normal. Masks are sampled from the study's real masks so
  that they keep their structure: R50 block i borrows study block i * n_study // 6 of its kind; each R50
  token's group mask is the concatenation of the masks of randomly drawn real tokens (enough to fill H/G
  groups), which keeps every group's open rate, co-activation within each part and the spread of per-token
  sparsity. SIBS keeps the same fraction of neurons per block as the study at that threshold (which
  neurons does not matter for a shrunk dense matmul). The end-to-end R50 model is randomly initialised
  (no download), at the input size `detr_r50_input`; its gates are random linear maps whose cost is paid,
  while the mask applied is the sampled one for the forward's token count.

FLOPs speedup = dense FFN MACs / (kept MACs + gate MACs) per block kind; end to end, whole-model FLOPs
(torch.utils.flop_counter, dense) over the same less the FFN work saved. ffn_share is the dense FFN blocks'
share of dense model time (forward hooks on the FFN blocks); amdahl_ceiling = 1 / (1 - ffn_share).
How close to the machine: a block row's `sparse_gflops` is its as-run FLOPs (2 per MAC, the gate's included)
per second, `dense_gflops` the same for dense, and `fraction_of_machine` the former over the machine's dense
throughput measured in the same run (`machine_dense_gflops`: a 1024-square float32 matmul at the same threads). The
CPU kernel also skips fc2 rows of ReLU zeros, so on real activations a speedup above the FLOPs ratio of
the gate mask is possible; random R50 weights give about 50 % ReLU zeros, trained DETR-R50 more.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detr_sparsity.config import StudyConfig
from detr_sparsity.evaluation.evaluate import evaluation_split
from detr_sparsity.execution.cpu_kernel import cpu_kernel, extension_name
from detr_sparsity.execution.gated_detr import SparseGatedFFN
from detr_sparsity.execution.gated_ffn import PackedFFN, sparse_ffn
from detr_sparsity.machine import environment
from detr_sparsity.mgs.gates import MicroGate, load_gates
from detr_sparsity.models.load import load_detr
from detr_sparsity.sparsity.blocks import block_order
from detr_sparsity.sparsity.ffn import ffn_blocks, ffn_layers, replace_ffns
from detr_sparsity.sparsity.profile import load_indicator
from detr_sparsity.sparsity.shrink import shrink_linear_pair
from detr_sparsity.sparsity.sibs import static_keep_masks

log = logging.getLogger("detr_sparsity.benchmark")

SHAPES = ("study", "detr-r50")
KINDS = ("encoder", "decoder")
# DETR-R50 (facebook/detr-resnet-50): widths, depth, queries; 850 encoder tokens = an 800 x 1066 image / 32.
R50 = {"d_model": 256, "ffn_dim": 2048, "layers": 6, "queries": 100, "encoder_tokens": 850}


# ---------------------------------------------------------------- timing

def medians_ms(variants: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each variant; every repeat runs every variant once, the order rotated."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


# ---------------------------------------------------------------- one FFN block and its sparse variants

@dataclass
class Block:
    """One FFN block to time: its weights, its input tokens, and per setting its MGS mask and SIBS keep."""

    name: str
    fc1: nn.Linear
    fc2: nn.Linear
    tokens: torch.Tensor  # (n, d)
    gates: dict[str, MicroGate] = field(default_factory=dict)  # by target
    open_groups: dict[str, torch.Tensor] = field(default_factory=dict)  # by target: (n, groups) bool
    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # by threshold: (H,) bool
    packed: PackedFFN | None = None
    shrunk: dict[str, tuple[nn.Linear, nn.Linear]] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return next(iter(self.gates.values())).group_size

    def kept_slots(self, target: str) -> int:
        """(token, neuron) slots the target's gate keeps open; every slot where `mgs.blocks` gates no block here."""
        if not self.gates:
            return self.tokens.shape[0] * self.fc1.out_features
        return int(_mask(self, target).sum().item()) * self.group_size

    @property
    def gate_macs(self) -> int:
        return self.tokens.shape[0] * self.fc1.in_features * (self.fc1.out_features // self.group_size) if self.gates else 0

    @property
    def macs(self) -> int:
        return 2 * self.tokens.shape[0] * self.fc1.in_features * self.fc1.out_features


def dense_ffn(block: Block) -> torch.Tensor:
    return block.fc2(torch.relu(block.fc1(block.tokens)))


def mgs_sparse(block: Block, target: str) -> torch.Tensor:
    """Gate and sparse kernel, as the take-away model runs them. The decision is recomputed (its cost paid);
    R50 blocks apply the sampled mask instead of their random gate's decision. An ungated block runs dense."""
    if not block.gates:
        return dense_ffn(block)
    gate = block.gates[target]
    decided = gate.open_groups(gate(block.tokens))
    return sparse_ffn(block.tokens, block.open_groups.get(target, decided), block.packed)


def mgs_masked(block: Block, target: str) -> torch.Tensor:
    if not block.gates:
        return dense_ffn(block)
    gate = block.gates[target]
    decided = gate.open_groups(gate(block.tokens))
    mask = block.open_groups.get(target, decided).to(block.tokens.dtype).repeat_interleave(gate.group_size, dim=-1)
    return block.fc2(torch.relu(block.fc1(block.tokens)) * mask)


def sibs_shrunk(block: Block, threshold: str) -> torch.Tensor:
    fc1, fc2 = block.shrunk[threshold]
    return fc2(torch.relu(fc1(block.tokens)))


def block_rows(shape: str, kind: str, blocks: list[Block], targets: list[str], thresholds: list[str],
               objective: str, repeats: int, warmup: int) -> list[dict]:
    if not any(block.gates for block in blocks):  # `mgs.blocks` gates none of this kind: no MGS rows
        targets = []
    for block in blocks:
        block.packed = PackedFFN(block.fc1, block.fc2, block.group_size) if block.gates else None
        block.shrunk = {t: shrink_linear_pair(block.fc1, block.fc2, block.keep[t]) for t in thresholds}

    def over_blocks(step) -> Callable[[], None]:
        return lambda: [step(b) for b in blocks]

    variants = {"dense": over_blocks(dense_ffn)}
    for t in targets:
        variants[f"mgs {t}"] = over_blocks(lambda b, t=t: mgs_sparse(b, t))
        variants[f"mgs {t} masked"] = over_blocks(lambda b, t=t: mgs_masked(b, t))
    for t in thresholds:
        variants[f"sibs {t}"] = over_blocks(lambda b, t=t: sibs_shrunk(b, t))
    with torch.no_grad():
        ms = medians_ms(variants, repeats, warmup)

    dense_macs = sum(b.macs for b in blocks)
    hidden_positions = sum(b.tokens.shape[0] * b.fc1.out_features for b in blocks)
    rows = []
    for t in targets:
        kept = sum(b.kept_slots(t) for b in blocks)
        sparse_macs = 2 * kept * blocks[0].fc1.in_features + sum(b.gate_macs for b in blocks)
        rows.append(_row(shape, kind, "mgs", t, objective, 1 - kept / hidden_positions, ms["dense"], ms[f"mgs {t}"],
                         dense_macs / sparse_macs, masked_ms=ms[f"mgs {t} masked"],
                         sparse_gflops=_gflops(sparse_macs, ms[f"mgs {t}"])))
    for t in thresholds:
        kept = sum(b.tokens.shape[0] * int(b.keep[t].sum()) for b in blocks)
        kept_macs = max(1, 2 * kept * blocks[0].fc1.in_features)
        rows.append(_row(shape, kind, "sibs", t, None, 1 - kept / hidden_positions, ms["dense"], ms[f"sibs {t}"],
                         dense_macs / kept_macs, sparse_gflops=_gflops(kept_macs, ms[f"sibs {t}"])))
    for row in rows:
        row["blocks"] = [b.name for b in blocks]
        row["tokens_per_block"] = blocks[0].tokens.shape[0]
        row["dense_gflops"] = _gflops(dense_macs, ms["dense"])
    return rows


def _gflops(macs: int, ms: float) -> float:
    """FLOPs (2 per multiply-accumulate) per second, in GFLOP/s."""
    return 2 * macs / (ms * 1e6)


# The machine's dense throughput: one square float32 matmul, large enough to run near the BLAS's peak.
PEAK_MATMUL = 1024


def machine_dense_gflops(repeats: int, warmup: int) -> float:
    """GFLOP/s of a PEAK_MATMUL-square float32 matmul at torch's current threads (median of `repeats`): the
    machine's dense throughput, against which a block row's `fraction_of_machine` reads the kernel's rate."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(PEAK_MATMUL, PEAK_MATMUL, generator=generator)
    b = torch.randn(PEAK_MATMUL, PEAK_MATMUL, generator=generator)
    ms = medians_ms({"matmul": lambda: torch.mm(a, b)}, max(repeats, 5), max(warmup, 1))["matmul"]
    return _gflops(PEAK_MATMUL ** 3, ms)


def _mask(block: Block, target: str) -> torch.Tensor:
    if target in block.open_groups:
        return block.open_groups[target]
    gate = block.gates[target]
    with torch.no_grad():
        return gate.open_groups(gate(block.tokens))


def _row(shape, scope, method, setting, objective, induced, dense_ms, sparse_ms, flops_speedup, **extra) -> dict:
    speedup = dense_ms / sparse_ms
    return {"shape": shape, "scope": scope, "method": method, "setting": setting, "objective": objective,
            "induced_sparsity": float(induced), "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": speedup,
            "flops_speedup": float(flops_speedup), "fraction_of_theoretical": speedup / float(flops_speedup),
            "gain": speedup > 1.0, **extra}


# ---------------------------------------------------------------- the study's shapes

@dataclass
class StudyInputs:
    model: transformers.DetrForObjectDetection
    batch: dict
    tokens: dict[str, torch.Tensor]  # per block: its FFN input, (n, d)
    gates: dict[str, dict[str, MicroGate]]  # by target, by block
    keep: dict[str, dict[str, torch.Tensor]]  # by threshold, by block


def study_inputs(cfg: StudyConfig, model_dir: Path, data_dir: Path, neurons: Path, gate_files: dict[str, Path],
                 thresholds: list[str]) -> StudyInputs:
    model = load_detr(model_dir).eval()
    batch = next(iter(evaluation_split(cfg, data_dir, scored=False).loader))
    tokens: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda _m, inputs, _out, name=name: tokens.__setitem__(
        name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]).contiguous()))
        for name, block in ffn_blocks(model).items()]
    with torch.no_grad():
        model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    for handle in handles:
        handle.remove()
    gates = {t: load_gates(path) for t, path in gate_files.items()}
    indicators = load_indicator(neurons, cfg.sibs["indicator"])
    keep = {t: static_keep_masks(indicators, float(t)) for t in thresholds}
    return StudyInputs(model, batch, tokens, gates, keep)


def study_blocks(inputs: StudyInputs, kind: str) -> list[Block]:
    blocks = []
    for name, block in sorted(ffn_blocks(inputs.model).items(), key=lambda item: block_order(item[0])):
        if name.startswith(kind):
            blocks.append(Block(name, block.fc1, block.fc2, inputs.tokens[name],
                                gates={t: g[name] for t, g in inputs.gates.items() if name in g},
                                keep={t: k[name] for t, k in inputs.keep.items()}))
    return blocks


# ---------------------------------------------------------------- DETR-R50's shapes, masks sampled from the study

def sample_group_masks(real: torch.Tensor, tokens: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """(tokens, groups) masks whose rows concatenate randomly drawn rows of `real` (n, g), cut to `groups`."""
    parts = math.ceil(groups / real.shape[1])
    picks = torch.randint(0, real.shape[0], (tokens, parts), generator=generator)
    return real[picks].reshape(tokens, parts * real.shape[1])[:, :groups].contiguous()


def sample_keep(real: torch.Tensor, hidden: int, generator: torch.Generator) -> torch.Tensor:
    """A static keep of `hidden` neurons with the same kept fraction as `real`."""
    kept = round(hidden * float(real.float().mean()))
    keep = torch.zeros(hidden, dtype=torch.bool)
    keep[torch.randperm(hidden, generator=generator)[:kept]] = True
    return keep


def random_gate(d_model: int, hidden: int, group_size: int) -> MicroGate:
    gate = MicroGate(d_model, hidden, group_size)
    nn.init.normal_(gate.gate.weight, std=d_model ** -0.5)
    return gate.eval()


def r50_blocks(kind: str, tokens: int, study: list[Block], targets: list[str], thresholds: list[str],
               seed: int) -> list[Block]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, hidden, layers = R50["d_model"], R50["ffn_dim"], R50["layers"]
    blocks = []
    for i in range(layers):
        source = study[i * len(study) // layers]
        fc1, fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        block = Block(f"{kind}.{i}", fc1, fc2, torch.randn(tokens, d, generator=generator))
        for t in targets if source.gates else ():  # ungated where its study block is
            block.gates[t] = random_gate(d, hidden, source.group_size)
            block.open_groups[t] = sample_group_masks(_mask(source, t), tokens, hidden // source.group_size, generator)
        block.keep = {t: sample_keep(source.keep[t], hidden, generator) for t in thresholds}
        blocks.append(block)
    return blocks


def detr_r50_model(seed: int) -> transformers.DetrForObjectDetection:
    """A randomly initialised DETR-R50 (ResNet-50 backbone built by transformers; no timm, no download)."""
    torch.manual_seed(seed)
    backbone = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                         hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                         out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=R50["d_model"],
                                     encoder_ffn_dim=R50["ffn_dim"], decoder_ffn_dim=R50["ffn_dim"],
                                     encoder_layers=R50["layers"], decoder_layers=R50["layers"],
                                     num_queries=R50["queries"], num_labels=91)
    return transformers.DetrForObjectDetection(config).eval()


class SampledMaskFFN(nn.Module):
    """A DETR-R50 FFN block run sparse end to end: its (random) gate is computed, so its cost is paid, and the
    sampled mask of this block is applied."""

    def __init__(self, block: nn.Module, gate: MicroGate, open_groups: torch.Tensor) -> None:
        super().__init__()
        self.gate, self.open_groups = gate, open_groups
        self.packed = PackedFFN(block.fc1, block.fc2, gate.group_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        decided = self.gate.open_groups(self.gate(hidden_states))
        if self.open_groups.numel() != decided.numel():
            raise RuntimeError(f"sampled masks for {tuple(self.open_groups.shape)} tokens x groups, the forward has "
                               f"{tuple(decided.shape)}")
        mask = self.open_groups.view(*decided.shape)
        return sparse_ffn(hidden_states, mask, self.packed)


# ---------------------------------------------------------------- end to end

def model_flops(model, batch: dict) -> int:
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        model(**batch)
    return mode.get_total_flops()


def ffn_share(model, batch: dict, repeats: int, warmup: int) -> float:
    """Share of a dense forward's time spent in the FFN blocks (forward hooks around each block)."""
    spent = [0.0]
    starts: list[float] = []
    blocks = ffn_blocks(model).values()
    handles = [b.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())) for b in blocks]
    handles += [b.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - starts.pop()))
                for b in blocks]
    shares = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            spent[0] = 0.0
            start = time.perf_counter()
            model(**batch)
            if i >= warmup:
                shares.append(spent[0] / (time.perf_counter() - start))
    for handle in handles:
        handle.remove()
    return statistics.median(shares)


def set_ffns(model, modules: dict[str, nn.Module]) -> None:
    replace_ffns(model, lambda name, _block: modules[name].eval())


def model_rows(shape: str, model, batch: dict, blocks: dict[str, Block], mgs_ffns: dict[str, dict[str, nn.Module]],
               thresholds: list[str], objective: str, repeats: int, warmup: int) -> tuple[list[dict], float]:
    """End-to-end rows of one shape: dense vs each MGS target (sparse) vs each SIBS threshold (shrunk)."""
    dense_modules = {name: layer.mlp for name, layer in ffn_layers(model).items()}
    shrunk_ffns = {t: {n: ShrunkFFN(*shrink_linear_pair(m.fc1, m.fc2, blocks[n].keep[t]))
                       for n, m in dense_modules.items()} for t in thresholds}

    def with_ffns(modules):
        def forward():
            set_ffns(model, modules)
            return model(**batch)
        return forward

    # End to end, masked dense is left out: it costs as much as dense plus the gates (see the block rows).
    variants = {"dense": with_ffns(dense_modules)}
    for t in mgs_ffns:
        variants[f"mgs {t}"] = with_ffns(mgs_ffns[t])
    for t in thresholds:
        variants[f"sibs {t}"] = with_ffns(shrunk_ffns[t])
    with torch.no_grad():
        ms = medians_ms(variants, repeats, warmup)
    set_ffns(model, dense_modules)

    share = ffn_share(model, batch, repeats, warmup)
    total = model_flops(model, batch)
    ffn_flops = sum(2 * b.macs for b in blocks.values())  # with the model's own token counts (see callers)
    d = next(iter(blocks.values())).fc1.in_features
    hidden_positions = sum(b.tokens.shape[0] * b.fc1.out_features for b in blocks.values())
    rows = []
    for t in mgs_ffns:
        kept = sum(b.kept_slots(t) for b in blocks.values())
        gate = sum(2 * b.gate_macs for b in blocks.values())
        sparse_total = total - ffn_flops + 4 * kept * d + gate
        rows.append(_row(shape, "model", "mgs", t, objective, 1 - kept / hidden_positions, ms["dense"], ms[f"mgs {t}"],
                         total / sparse_total))
    for t in thresholds:
        kept = sum(b.tokens.shape[0] * int(b.keep[t].sum()) for b in blocks.values())
        rows.append(_row(shape, "model", "sibs", t, None, 1 - kept / hidden_positions, ms["dense"], ms[f"sibs {t}"],
                         total / (total - ffn_flops + 4 * kept * d)))
    for row in rows:
        # What FFN sparsity alone could give end to end at this FLOPs cut (Amdahl on the measured time share).
        ffn_only = (1 - row["induced_sparsity"])
        row["amdahl_ceiling_at_sparsity"] = 1 / ((1 - share) + share * ffn_only)
        row["model_flops_dense"] = total
        row["ffn_flops_dense"] = ffn_flops
    return rows, share


class ShrunkFFN(nn.Module):
    """A DETR FFN block with SIBS's physically shrunk fc1 / fc2 (what `shrink_ffns` builds in place)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(hidden_states)))


# ---------------------------------------------------------------- the stage

def run_benchmark(cfg: StudyConfig, model_dir: Path, data_dir: Path, neurons: Path, gate_files: dict[str, Path],
                  settings: dict | None = None) -> dict:
    """Measure every configured row (MGS: the gate set of each target in `gate_files`); returns speed.json's
    content."""
    settings = settings or cfg.benchmark
    threads, repeats, warmup = settings["threads"], settings["repeats"], settings["warmup"]
    model_repeats = settings["model_repeats"]
    objective, shapes = settings["objective"], settings["shapes"]
    torch.set_num_threads(threads)
    kernel = cpu_kernel() is not None
    # Other jobs on the machine slow every variant alike (interleaved), but widen the spread: recorded.
    load_at_start = list(os.getloadavg())
    targets = list(gate_files)
    thresholds = [str(t) for t in cfg.sibs["thresholds"]]
    log.info("benchmark: shapes %s, %d threads, %d repeats after %d warm-up; MGS %s targets %s; SIBS %s; "
             "CPU kernel %s", shapes, threads, repeats, warmup, objective, targets, thresholds,
             "compiled" if kernel else "unavailable (PyTorch dispatch)")
    inputs = study_inputs(cfg, model_dir, data_dir, neurons, gate_files, thresholds)
    study = {kind: study_blocks(inputs, kind) for kind in KINDS}
    rows, shares, model_inputs = [], {}, {}
    peak_gflops = machine_dense_gflops(repeats, warmup)
    log.info("machine: %.1f GFLOP/s on a %d-square float32 matmul, %d thread(s)", peak_gflops, PEAK_MATMUL, threads)

    if "study" in shapes:
        for kind in KINDS:
            rows += block_rows("study", kind, study[kind], targets, thresholds, objective, repeats, warmup)
            log.info("study %s blocks measured", kind)
        model = inputs.model
        blocks = {b.name: b for kind in KINDS for b in study[kind]}
        layers = ffn_layers(model)
        mgs = {t: {n: SparseGatedFFN(layers[n].mlp, inputs.gates[t][n]) if n in inputs.gates[t] else layers[n].mlp
                   for n in layers} for t in targets}
        batch = {"pixel_values": inputs.batch["pixel_values"], "pixel_mask": inputs.batch["pixel_mask"]}
        model_rows_study, shares["study"] = model_rows("study", model, batch, blocks, mgs, thresholds, objective,
                                                       model_repeats, warmup)
        rows += model_rows_study
        model_inputs["study"] = {"images": int(batch["pixel_values"].shape[0]),
                                 "height": int(batch["pixel_values"].shape[2]),
                                 "width": int(batch["pixel_values"].shape[3])}
        log.info("study end to end measured (FFN share %.3f)", shares["study"])

    if "detr-r50" in shapes:
        tokens = {"encoder": R50["encoder_tokens"], "decoder": R50["queries"]}
        for kind in KINDS:
            blocks = r50_blocks(kind, tokens[kind], study[kind], targets, thresholds, cfg.seed)
            rows += block_rows("detr-r50", kind, blocks, targets, thresholds, objective, repeats, warmup)
            log.info("detr-r50 %s blocks measured", kind)
        size = settings["detr_r50_input"]
        model = detr_r50_model(cfg.seed)
        batch = {"pixel_values": torch.randn(1, 3, size["height"], size["width"]),
                 "pixel_mask": torch.ones(1, size["height"], size["width"], dtype=torch.long)}
        features = math.ceil(size["height"] / 32) * math.ceil(size["width"] / 32)
        e2e_tokens = {"encoder": features, "decoder": R50["queries"]}
        blocks = {}
        for kind in KINDS:
            for b in r50_blocks(kind, e2e_tokens[kind], study[kind], targets, thresholds, cfg.seed + 1):
                blocks[b.name] = b
        layers = ffn_layers(model)
        mgs = {t: {n: SampledMaskFFN(layers[n].mlp, blocks[n].gates[t], blocks[n].open_groups[t])
                   if blocks[n].gates else layers[n].mlp for n in layers} for t in targets}
        model_rows_r50, shares["detr-r50"] = model_rows("detr-r50", model, batch, blocks, mgs, thresholds,
                                                        objective, model_repeats, warmup)
        rows += model_rows_r50
        model_inputs["detr-r50"] = {"images": 1, "height": size["height"], "width": size["width"],
                                    "encoder_tokens": features, "weights": "random (seeded), no download"}
        log.info("detr-r50 end to end measured (FFN share %.3f)", shares["detr-r50"])

    for row in rows:
        if "sparse_gflops" in row:
            row["fraction_of_machine"] = row["sparse_gflops"] / peak_gflops
    result = {
        "benchmark": "speed",
        "study": cfg.name,
        "environment": {**environment(), "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
                        "cpu_kernel": f"compiled C++/OpenMP ({extension_name()})" if kernel
                        else "unavailable: PyTorch dispatch"},
        "threads": threads, "repeats": repeats, "model_repeats": model_repeats, "warmup": warmup,
        "machine_dense_gflops": {"gflops": peak_gflops, "matmul": PEAK_MATMUL, "threads": threads},
        "rows": rows,
        "ffn_share": shares,
        "amdahl_ceiling": {shape: 1 / (1 - share) for shape, share in shares.items()},
        "model_inputs": model_inputs,
        "block_tokens": {"study": {kind: int(study[kind][0].tokens.shape[0]) for kind in KINDS},
                         "detr-r50": {"encoder": R50["encoder_tokens"], "decoder": R50["queries"]}},
    }
    return result


def format_table(result: dict) -> str:
    lines = [f"{'shape':9} {'scope':8} {'method':6} {'setting':8} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} "
             f"{'speedup':>7} {'FLOPs x':>7} {'fraction':>8} {'of peak':>7}"]
    for r in result["rows"]:
        of_peak = f"{r['fraction_of_machine']:7.2f}" if "fraction_of_machine" in r else f"{'':7}"
        lines.append(f"{r['shape']:9} {r['scope']:8} {r['method']:6} {r['setting']:8} {r['induced_sparsity']:8.3f} "
                     f"{r['dense_ms']:9.2f} {r['sparse_ms']:9.2f} {r['speedup']:7.2f} {r['flops_speedup']:7.2f} "
                     f"{r['fraction_of_theoretical']:8.2f} {of_peak}" + ("" if r["gain"] else "  no gain"))
    peak = result["machine_dense_gflops"]
    lines.append(f"machine: {peak['gflops']:.1f} GFLOP/s dense ({peak['matmul']}-square float32 matmul, "
                 f"{peak['threads']} thread(s)); `of peak`: the sparse computation's FLOPs (gate included) per "
                 f"second against it")
    for shape, share in result["ffn_share"].items():
        lines.append(f"{shape}: FFN share of dense model time {share:.3f}, Amdahl ceiling "
                     f"{result['amdahl_ceiling'][shape]:.3f}x")
    return "\n".join(lines)
