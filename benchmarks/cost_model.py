"""What the COCO study costs on GPUs, from what a finished run of a smaller study measured.

    python benchmarks/cost_model.py --project <dir of a run> [--gpu-tflops 4.8] [--gpus 1 4 8] [--out docs/cost-model.md]

Reads, without writing there: the run's MLflow store (<project>/mlflow.db: wall time of every finished stage run),
results/<study>/mgs/trained/*.json (gate-training time) and results/<study>/summary.json (FLOPs per image), plus this checkout's params.yaml (both studies' settings). Per stage:
the work of one job (image forward passes, or gate-training samples) times its FLOPs, then
  - the measured CPU rate of the stage (FLOPs done per second of the fastest finished run), and
  - an assumed sustained GPU rate (--gpu-tflops; no GPU was measured),
and for N GPUs a list schedule of the COCO study's jobs (independent jobs, e.g. one per evaluated configuration,
run side by side; a job waits for its inputs). Writes JSON beside the Markdown.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from detr_sparsity.config import StudyConfig, load_config  # noqa: E402
from detr_sparsity.mgs.objectives import LAYER_LOCAL  # noqa: E402

# DETR-R50 at DETR's 800/1333 input (about 850 encoder tokens): 86 G multiply-accumulates per image (the DETR
# paper's "GFLOPS" column counts MACs; FFNs about 7 % of it, STUDY.md), i.e. 172 GFLOPs in this project's
# convention (FLOPs = 2 x MACs, summary.json's flops_convention). It ran at 28 images/s on a V100 (DETR paper,
# Table 1): 172 GFLOPs x 28 = 4.8 TFLOP/s sustained, the default GPU rate.
COCO_FLOPS_PER_IMAGE = 172e9
COCO_ENCODER_TOKENS = 850
DEFAULT_GPU_TFLOPS = 4.8
# Gate training back-propagates through the frozen transformer to the gates (activations' gradients, no weight
# gradients): about twice a forward pass of the transformer per sample.
TRAIN_STEP_FORWARDS = 2.0
COCO_VAL_IMAGES = 5000
GPU_STAGES = ["evaluate", "profile", "masking", "sibs", "mgs_cache", "mgs_train", "mgs_evaluate"]


def transformer_flops(arch: dict, tokens: float) -> float:
    """FLOPs (2 x MACs) of DETR's encoder and decoder per image: projections, attention, FFNs."""
    d, h, queries = arch["d_model"], arch["ffn_dim"], arch["num_queries"]
    encoder = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * h
    decoder = (4 * queries * d * d + 2 * queries * queries * d  # self-attention
               + 2 * queries * d * d + 2 * tokens * d * d + 2 * queries * tokens * d  # cross-attention
               + 2 * queries * d * h)
    return 2 * (arch["encoder_layers"] * encoder + arch["decoder_layers"] * decoder)


def ffn_flops(arch: dict, tokens: float) -> float:
    return 2 * 2 * arch["d_model"] * arch["ffn_dim"] * (arch["encoder_layers"] * tokens
                                                        + arch["decoder_layers"] * arch["num_queries"])


DETR_R50 = {"d_model": 256, "ffn_dim": 2048, "encoder_layers": 6, "decoder_layers": 6, "num_queries": 100}


def jobs_of(cfg: StudyConfig, arch: dict, val_images: int, calibration_images: int) -> dict[str, tuple[int, float]]:
    """Per stage: (jobs, work units per job); a unit is an image forward pass, or a gate-training sample."""
    blocks = arch["encoder_layers"] + arch["decoder_layers"]
    gate_sets = len(cfg.mgs["objectives"]) * len(cfg.mgs["targets"])
    end_to_end = [o for o in cfg.mgs["objectives"] if o != LAYER_LOCAL]  # trained once each, in one job
    training = cfg.gate_training["training"]
    cache = cfg.gate_training["cache"]["images"] or (cfg.data.get("train_images")
                                                      or cfg.data.get("splits", {}).get("train"))
    return {
        "evaluate": (1, val_images),
        "profile": (1, calibration_images),
        "masking": (len(cfg.masking["methods"]) * len(cfg.masking["keep_ratios"]), (blocks + 1) * val_images),
        "sibs": (len(cfg.sibs["thresholds"]), val_images),
        "mgs_cache": (1, cache),
        "mgs_train": (1, len(end_to_end) * training["steps"] * training["batch_size"]),
        "mgs_evaluate": (gate_sets, val_images),
    }


def stage_seconds(project: Path, study: str) -> dict[str, list[float]]:
    """Wall seconds of every finished MLflow run of the study, per stage (read from a copy of the store)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlflow.db"
        source = sqlite3.connect(f"file:{project / 'mlflow.db'}?mode=ro", uri=True)
        target = sqlite3.connect(copy)
        source.backup(target)
        source.close()
        rows = target.execute(
            "select r.end_time - r.start_time, s.value from runs r"
            " join tags s on s.run_uuid = r.run_uuid and s.key = 'stage'"
            " join tags t on t.run_uuid = r.run_uuid and t.key = 'study' and t.value = ?"
            " where r.status = 'FINISHED' and r.end_time is not null", (study,)).fetchall()
        target.close()
    seconds: dict[str, list[float]] = {}
    for millis, stage in rows:
        seconds.setdefault(stage, []).append(millis / 1000)
    return seconds


def schedule(jobs: list[dict], gpus: int) -> float:
    """Makespan of a greedy list schedule: GPU jobs share `gpus` devices, longest ready job first; others run at once."""
    done: dict[str, float] = {}
    free = [0.0] * gpus
    pending = list(jobs)
    while pending:
        ready = [j for j in pending if all(d in done for d in j["after"])]
        ready.sort(key=lambda j: -j["seconds"])
        job = ready[0]
        start = max([done[d] for d in job["after"]], default=0.0)
        if job["gpu"]:
            device = heapq.heappop(free)
            start = max(start, device)
            heapq.heappush(free, start + job["seconds"])
        done[job["name"]] = start + job["seconds"]
        pending.remove(job)
    return max(done.values())


def coco_jobs(stages: dict[str, dict]) -> list[dict]:
    """The COCO study's GPU jobs and what each waits for (data and model, downloads, come before all of them)."""
    after = {"sibs": lambda i: ["profile-0"], "mgs_train": lambda i: ["mgs_cache-0"],
             "mgs_evaluate": lambda i: ["mgs_train-0"]}
    return [{"name": f"{stage}-{i}", "after": after.get(stage, lambda i: [])(i), "gpu": True,
             "seconds": row["coco_gpu_seconds_per_job"]}
            for stage, row in stages.items() for i in range(row["coco_jobs"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="directory of a finished run (mlflow.db, results/)")
    parser.add_argument("--study", default="synthetic", help="the measured study")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="both studies' settings")
    parser.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS, help="assumed sustained GPU rate")
    parser.add_argument("--host-ms-per-image", type=float, default=0.0,
                        help="host-side time per evaluated image on the GPU node (decode, resize, COCOeval): assumed")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", type=Path, default=Path("docs/cost-model.md"))
    args = parser.parse_args(argv)

    measured, coco = load_config(args.params, study=args.study), load_config(args.params, study="coco")
    arch = measured.model["architecture"]
    dense = next(r for r in json.loads((args.project / "results" / args.study / "summary.json").read_text())
                 if r["method"] == "dense")
    flops_image = dense["total_flops"]["dense"]
    # The encoder tokens of the measured study, from its measured FFN FLOPs (the only shape-dependent term).
    tokens = ((dense["ffn_flops"]["dense"] / (4 * arch["d_model"] * arch["ffn_dim"]) - arch["decoder_layers"]
               * arch["num_queries"]) / arch["encoder_layers"])
    unit_flops = {"measured": {s: flops_image for s in GPU_STAGES}, "coco": {s: COCO_FLOPS_PER_IMAGE for s in GPU_STAGES}}
    unit_flops["measured"]["mgs_train"] = TRAIN_STEP_FORWARDS * transformer_flops(arch, tokens)
    unit_flops["coco"]["mgs_train"] = TRAIN_STEP_FORWARDS * transformer_flops(DETR_R50, COCO_ENCODER_TOKENS)

    seconds = stage_seconds(args.project, args.study)
    # A gate training resumed from its checkpoint has an MLflow run for the rest only: its record keeps the training
    # time summed over every part. The job trains every end-to-end objective.
    trained = sorted((args.project / "results" / args.study / "mgs" / "trained").glob("*.json"))
    seconds["mgs_train"] = [sum(json.loads(f.read_text())["final"]["train_seconds"] for f in trained)] if trained else []
    splits = measured.data["splits"]
    measured_jobs = jobs_of(measured, arch, splits[measured.evaluate["split"]], splits[measured.profile["split"]])
    coco_work = jobs_of(coco, DETR_R50, coco.data["val_images"] or COCO_VAL_IMAGES, coco.data["calibration_images"])
    stages = {}
    for stage in GPU_STAGES:
        runs = seconds.get(stage, [])
        if not runs:
            raise SystemExit(f"no finished {stage} run of study {args.study} in {args.project / 'mlflow.db'}")
        n_jobs, units = measured_jobs[stage]
        fastest = min(runs)
        cpu_rate = units * unit_flops["measured"][stage] / fastest  # FLOP/s the CPU achieved in this stage
        c_jobs, c_units = coco_work[stage]
        c_flops = c_units * unit_flops["coco"][stage]
        stages[stage] = {
            "measured_runs": len(runs), "measured_seconds_fastest": fastest,
            "measured_seconds_median": statistics.median(runs), "measured_units_per_job": units,
            "measured_units_per_second": units / fastest, "measured_cpu_gflops": cpu_rate / 1e9,
            "coco_jobs": c_jobs, "coco_units_per_job": c_units, "coco_gflops_per_unit": unit_flops["coco"][stage] / 1e9,
            "coco_cpu_hours": c_jobs * c_flops / cpu_rate / 3600,
            "coco_gpu_seconds_per_job": c_flops / (args.gpu_tflops * 1e12)
            + (0 if stage == "mgs_train" else c_units * args.host_ms_per_image / 1000),
        }
        stages[stage]["coco_gpu_hours"] = c_jobs * stages[stage]["coco_gpu_seconds_per_job"] / 3600
    total = sum(s["coco_gpu_hours"] for s in stages.values())
    wall = {n: schedule(coco_jobs(stages), n) / 3600 for n in args.gpus}
    result = {"measured_study": args.study, "measured_flops_per_image": flops_image,
              "measured_encoder_tokens": tokens, "coco_flops_per_image": COCO_FLOPS_PER_IMAGE,
              "gpu_tflops": args.gpu_tflops, "host_ms_per_image": args.host_ms_per_image,
              "command": "python benchmarks/cost_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "train_step_forwards": TRAIN_STEP_FORWARDS, "stages": stages,
              "coco_gpu_hours": total, "coco_wall_hours_by_gpus": wall}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    """docs/cost-model.md: the table, the totals, and every assumption behind them."""
    ordered = sorted(r["stages"].items(), key=lambda kv: -kv[1]["coco_gpu_hours"])
    rows = ["| stage | COCO jobs | work per job | measured: s per job (fastest of n runs) "
            "| measured: units/s, CPU GFLOP/s | COCO GFLOPs per unit | COCO on this CPU: h | COCO on 1 GPU: h | share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, s in ordered:
        unit = "samples" if stage == "mgs_train" else "images"
        rows.append(f"| {stage} | {s['coco_jobs']} | {s['coco_units_per_job']:,} {unit} "
                    f"| {s['measured_seconds_fastest']:.0f} ({s['measured_runs']}) "
                    f"| {s['measured_units_per_second']:.1f}, {s['measured_cpu_gflops']:.1f} "
                    f"| {s['coco_gflops_per_unit']:.0f} | {s['coco_cpu_hours']:,.0f} | {s['coco_gpu_hours']:.1f} "
                    f"| {s['coco_gpu_hours'] / r['coco_gpu_hours']:.0%} |")
    wall = ["| GPUs | " + " | ".join(str(n) for n in r["coco_wall_hours_by_gpus"]) + " |",
            "|---|" + "---:|" * len(r["coco_wall_hours_by_gpus"]),
            "| wall time, h | " + " | ".join(f"{h:.1f}" for h in r["coco_wall_hours_by_gpus"].values()) + " |"]
    (top, first), (second, then) = ordered[0], ordered[1]
    cpu_hours = sum(s["coco_cpu_hours"] for s in r["stages"].values())
    return "\n".join([
        "# Cost model: the COCO study on GPUs",
        "",
        f"<!-- generated by `{r['command']}`; do not edit by hand -->",
        "",
        f"Measured: the {r['measured_study']} study's run (MLflow store: wall time of every finished stage run; "
        "gate training: `train_seconds` of each objective's training record, summed over resumed parts), "
        "on this project's 2-core CPU machine, each job one thread, two jobs at a time, the machine shared with "
        "other work: the fastest finished run of a stage is taken as its cost (slower runs waited on the CPU). "
        "A unit is one image forward pass, or for `mgs_train` one gate-training sample. "
        "**No GPU was available in this session: every GPU figure is the stage's FLOPs divided by an assumed "
        "sustained rate**, not a measurement.",
        "",
        *rows,
        "",
        f"In all: **{r['coco_gpu_hours']:.1f} GPU-hours** on one GPU at {r['gpu_tflops']} TFLOP/s sustained "
        f"(about {cpu_hours:,.0f} hours on one core of this CPU at the rates it reached per stage). "
        "On N GPUs (a greedy schedule of the jobs, each waiting for its inputs):",
        "",
        *wall,
        "",
        "## Which stages dominate",
        "",
        f"- `{top}`: {first['coco_gpu_hours'] / r['coco_gpu_hours']:.0%} of the GPU work: {first['coco_jobs']} jobs "
        f"of {first['coco_units_per_job']:,} image passes each "
        + ("(every FFN block masked alone, then all at once: 13 passes over the 5,000 val images per keep "
           "ratio and method). Fewer keep ratios, or the per-block scopes on a val subset, cut it most."
           if top == "masking" else "."),
        f"- `{second}`: {then['coco_gpu_hours'] / r['coco_gpu_hours']:.0%}; the rest are small.",
        "- Everything but `profile` and `mgs_cache` comes as independent jobs (one per sweep point, gate-training "
        "target or evaluated configuration), so the study parallelises almost perfectly up to about a dozen GPUs; "
        "beyond that the longest single job (one masking point) bounds the wall time.",
        "",
        "## Assumptions (each a parameter of benchmarks/cost_model.py or a constant at its top)",
        "",
        f"- FLOPs = 2 x multiply-accumulates, as in summary.json. The measured study: "
        f"{r['measured_flops_per_image'] / 1e9:.3f} GFLOPs per image (its dense row); DETR-R50 at DETR's 800/1333 "
        f"input: {r['coco_flops_per_image'] / 1e9:.0f} GFLOPs (the DETR paper's 86 \"GFLOPS\" count "
        "multiply-accumulates; STUDY.md), about 850 encoder tokens.",
        f"- GPU rate: {r['gpu_tflops']} TFLOP/s sustained (`--gpu-tflops`): DETR-R50's published 28 images/s on a "
        "V100 (DETR paper, Table 1) x 172 GFLOPs. A100- or H100-class GPUs are faster; rerun with their rate.",
        f"- Host-side time per evaluated image on the GPU node (JPEG decode, resize to 800/1333, post-processing, "
        f"COCOeval): {r['host_ms_per_image']:g} ms (`--host-ms-per-image`, assumed). On the CPU it mattered: "
        "the evaluation stages reached 3-20 GFLOP/s while gate training reached far more on the same core.",
        f"- Gate training: {r['train_step_forwards']:g} x a transformer forward per sample (the backbone is cached by "
        "`mgs_cache`; the backward pass computes activation gradients only, the weights being frozen). Transformer "
        "FLOPs are computed from the shapes; the measured study's encoder tokens "
        f"({r['measured_encoder_tokens']:.0f}) are inferred from its measured FFN FLOPs.",
        "- The measured CPU rate of each stage (FLOPs done per second) carries over to COCO for the \"this CPU\" "
        "column; overheads that do not grow with FLOPs make that column pessimistic for evaluation stages.",
        "- Not modelled: `data` and `model` for COCO are downloads (val2017 and annotations, about 1 GB, plus the "
        "train2017 subset fetched image by image; the hub checkpoint), bound by bandwidth, no GPU; `benchmark` is "
        "a CPU job of fixed size (the same DETR-R50 shapes in every study) that runs beside the GPU jobs; "
        "`summary`, `figures`, `tables`, `paper` take seconds. Queue waits of a shared cluster are not included.",
        "- The stages run on the job's device (CUDA where a GPU was granted), but no GPU has been measured: the GPU "
        "figures rest on the assumed sustained rate above. Sharded evaluation (`evaluate.shards`) is not modelled: "
        "it splits each evaluation job into shards that run side by side, which shortens the N-GPU wall time "
        "when there are fewer evaluation jobs than GPUs.",
        ""])


if __name__ == "__main__":
    raise SystemExit(main())
