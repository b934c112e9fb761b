"""What the benchmarks of a finished study share: their common arguments, and writing and reporting their result.
Not a benchmark itself: the scripts beside it import it (run as `python benchmarks/<name>.py`, their folder is first
on the import path)."""

from __future__ import annotations

import argparse
from pathlib import Path

from detr_sparsity.atomic import write_json
from detr_sparsity.config import StudyConfig, load_config
from detr_sparsity.machine import environment
from detr_sparsity.pipeline import path


def arguments(doc: str, name: str, repeats: int | None, threads: str | None = None) -> argparse.ArgumentParser:
    """The arguments every study benchmark `name` takes, described by the first line of its `doc`: --params,
    --threads (torch threads, default 1; `threads` names the pipeline jobs that run with 1, and None leaves the
    option out), --repeats (default `repeats`; None leaves it out, for a benchmark that runs once) and --out. The
    script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    if threads is not None:
        parser.add_argument("--threads", type=int, default=1, help=f"torch threads ({threads} run with 1)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=None, help=f"default: results/<study>/benchmark/{name}.json")
    return parser


def kernel_arguments(doc: str, name: str) -> argparse.ArgumentParser:
    """`arguments` of the kernel benchmarks (11 repeats by default), with the thread counts measured and the warm-up
    runs before each variant's timed ones."""
    parser = arguments(doc, name, repeats=11)
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="torch threads, each measured")
    parser.add_argument("--warmup", type=int, default=2)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, StudyConfig]:
    """The parsed arguments and the study's config (--params); torch set to --threads where the benchmark takes it."""
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    if "threads" in vars(args):
        import torch  # only the benchmarks that run a model take --threads: the others need not import torch

        torch.set_num_threads(args.threads)
    return args, cfg


def counting_sparse_ffns(model, gates, counting):
    """`sparse_ffns` that counts whatever it is asked, as gate training did before it stopped counting: put in place
    of `mgs.training.sparse_ffns` (train_gates looks it up in its module at each call) to time the counting."""
    from detr_sparsity.sparsity.ffn import sparse_ffns  # torch: only the gate-training benchmarks need it

    return sparse_ffns(model, gates, counting=True)


def masking_points(cfg: StudyConfig, model, points: list[str]):
    """Each 'METHOD:KEEP_RATIO' point (`--points`) of stage `masking` as the stage evaluates it: (method, keep-ratio,
    its scopes' policy factory, `masking.scope_policies`), the threshold oracle calibrated as the stage calibrates it
    (outside whatever the caller times)."""
    from detr_sparsity.sparsity.ffn import ffn_blocks  # torch: only the masking benchmarks need these
    from detr_sparsity.stages.masking import calibration_record, scope_policies

    blocks = list(ffn_blocks(model))
    data_dir = path("data", "out", cfg.name)
    for point in points:
        method, keep_ratio = point.split(":")
        keep_ratio = float(keep_ratio)
        calibration = calibration_record(cfg, model, data_dir, keep_ratio) if method == "threshold" else None
        yield method, keep_ratio, scope_policies(method, keep_ratio, cfg.seed, blocks, calibration)


def report(result: dict, out: Path | None, study: str, summary: str) -> int:
    """Write a benchmark's `result` with the machine's environment added (last) to `out`, by default
    results/<study>/benchmark/<result["benchmark"]>.json beside the benchmark stage's output; print `summary` and
    the path; return the exit status (0)."""
    out = out or path("benchmark", "out", study).parent / f"{result['benchmark']}.json"
    write_json(out, {**result, **environment()})
    print(f"{summary} ({out})")
    return 0


def kernel_study_inputs(cfg: StudyConfig):
    """What the kernel benchmarks measure on: the study's inputs (`execution.benchmark.study_inputs`) with the gate
    sets of `benchmark.objective`, as (gate files by target, SIBS thresholds, inputs). None, after saying why on
    stderr, where the C++ kernel cannot be built here or the study has no gates yet."""
    import sys

    from detr_sparsity.execution import benchmark as speed
    from detr_sparsity.execution.cpu_kernel import cpu_kernel
    from detr_sparsity.pipeline import gathered_points

    if cpu_kernel() is None:
        print("error: the C++ kernel could not be built here (see the log above); nothing to compare",
              file=sys.stderr)
        return None
    gate_files = {str(point["target"]): file for point, file in gathered_points(cfg, "benchmark", "gates")}
    missing = [str(f) for f in gate_files.values() if not f.is_file()]
    if missing:
        print(f"error: no gates at {', '.join(missing)}; run the pipeline first (snakemake --cores 8)",
              file=sys.stderr)
        return None
    thresholds = [str(t) for t in cfg.sibs["thresholds"]]
    inputs = speed.study_inputs(cfg, path("model", "out", cfg.name), path("data", "out", cfg.name),
                                path("profile", "neurons", cfg.name), gate_files, thresholds)
    return gate_files, thresholds, inputs


def r50_trained_masks(cfg: StudyConfig, gate_files: dict, thresholds: list[str], inputs):
    """DETR-R50's FFN blocks as the benchmark stage builds them, with the study's trained gates' masks: per block kind
    (skipping a kind `mgs.blocks` gates no block of) and per target, (kind, tokens per block, target, blocks, packed
    weights by block, masks by block)."""
    from detr_sparsity.execution import benchmark as speed
    from detr_sparsity.execution.gated_ffn import PackedFFN

    tokens = {"encoder": speed.R50["encoder_tokens"], "decoder": speed.R50["queries"]}
    for kind in speed.KINDS:
        blocks = [b for b in speed.r50_blocks(kind, tokens[kind], speed.study_blocks(inputs, kind), list(gate_files),
                                              thresholds, cfg.seed) if b.gates]
        if not blocks:
            continue
        packed = {b.name: PackedFFN(b.fc1, b.fc2, b.group_size) for b in blocks}
        for target in gate_files:
            yield kind, tokens[kind], target, blocks, packed, {b.name: b.open_groups[target].contiguous()
                                                               for b in blocks}


def kernel_direct(kernel, blocks, masks: dict, packed: dict):
    """`blocks` through a built kernel module's `gated_ffn`, called directly with `kernel_tile`'s tile for the
    current threads: without `sparse_ffn`'s checks (about 15 us per call, a sixth of a small decoder block's time)."""
    import torch

    from detr_sparsity.execution.gated_ffn import kernel_tile

    return lambda: [kernel.gated_ffn(b.tokens, masks[b.name], packed[b.name].weights, packed[b.name].b1g.view(-1),
                                     packed[b.name].b2, kernel_tile(b.tokens.shape[0], torch.get_num_threads()))
                    for b in blocks]


def flops_bound(blocks, masks: dict) -> tuple[float, float]:
    """(induced sparsity, FLOPs bound) of `blocks` under `masks`, the gate left out: dense MACs / kept MACs."""
    kept = sum(int(masks[b.name].sum()) * b.group_size for b in blocks)
    positions = sum(b.tokens.shape[0] * b.fc1.out_features for b in blocks)
    return 1 - kept / positions, positions / kept
