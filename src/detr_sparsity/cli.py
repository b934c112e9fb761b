"""`python -m detr_sparsity <stage>`: one subcommand per pipeline stage.

Snakemake and DVC call exactly these commands. Each reads params.yaml (validated before any work),
writes only its declared outputs, logs to its log file, and records one MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detr_sparsity.config import ConfigError, StudyConfig, load_config

log = logging.getLogger("detr_sparsity")


def _setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def cmd_init_tracking(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking

    tracking.init_store(cfg)


def cmd_validate(cfg: StudyConfig, args) -> None:
    print(f"params.yaml is valid; study {cfg.name!r}")


def cmd_data(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.data.prepare import prepare_data

    with tracking.stage_run(cfg, "data") as run:
        manifest = prepare_data(cfg, args.out)
        run.log_artifact(args.out / "splits.json")
        run.log_metrics({f"images_{split}": _count_images(args.out, split) for split in manifest})


def _count_images(data_dir: Path, split: str) -> int:
    from detr_sparsity.data.dataset import CocoDetection, load_split

    return len(CocoDetection(load_split(data_dir, split)))


def cmd_model(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.models.stage import build_model

    with tracking.stage_run(cfg, "model") as run:
        info = build_model(cfg, args.data, args.out, run)
        run.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
        run.log_artifact(args.out / "config.json")
        run.log_artifact(args.out / "model_info.json")


def cmd_evaluate(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.evaluation.evaluate import evaluate

    with tracking.stage_run(cfg, "evaluate", setting={"method": args.method}) as run:
        evaluate(cfg, args.method, args.model, args.data, args.detections, args.row, run)


def cmd_profile(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.profile import profile_stage

    with tracking.stage_run(cfg, "profile") as run:
        profile_stage(cfg, args.model, args.data, args.out, run)


def cmd_masking(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.masking import masking_stage

    with tracking.stage_run(cfg, "masking", setting={"method": args.method, "keep_ratio": args.keep_ratio}) as run:
        masking_stage(cfg, args.method, args.keep_ratio, args.model, args.data, args.detections, args.rows, run)


def cmd_sibs(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.sibs import sibs_stage

    with tracking.stage_run(cfg, "sibs", setting={"threshold": args.threshold}) as run:
        sibs_stage(cfg, args.threshold, args.model, args.data, args.profile, args.detections, args.row, run)


def cmd_mgs_cache(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.mgs.stage import mgs_cache_stage

    with tracking.stage_run(cfg, "mgs_cache") as run:
        mgs_cache_stage(cfg, args.model, args.data, args.out, run)


def cmd_mgs_train(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.mgs.stage import mgs_train_stage

    with tracking.stage_run(cfg, "mgs_train", setting={"objective": args.objective, "target": args.target}) as run:
        mgs_train_stage(cfg, args.objective, args.target, args.model, args.cache, args.gates, args.training, run)
        run.log_artifact(args.training)


def cmd_mgs_evaluate(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.mgs.stage import mgs_evaluate_stage

    with tracking.stage_run(cfg, "mgs_evaluate", setting={"objective": args.objective, "target": args.target}) as run:
        mgs_evaluate_stage(cfg, args.objective, args.target, args.model, args.data, args.gates, args.training, args.detections,
                           args.row, run)


def cmd_summary(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.atomic import write_json
    from detr_sparsity.reporting.summary import gather, headline_metrics, row_files

    with tracking.stage_run(cfg, "summary") as run:
        rows = gather(row_files(cfg), args.out)
        write_json(args.metrics, headline_metrics(rows))
        run.log_metrics({"rows": len(rows)})
        run.log_artifact(args.out)
        run.log_artifact(args.metrics)


def cmd_figures(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.reporting.figures import figures_stage

    with tracking.stage_run(cfg, "figures") as run:
        drawn = figures_stage(cfg.name, cfg.evaluate["split"], args.summary, args.profile, args.speed, args.out,
                              args.plots, run)
        run.log_metrics({"figures": len(drawn)})


def cmd_tables(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.reporting.tables import tables_stage

    with tracking.stage_run(cfg, "tables") as run:
        written = tables_stage(cfg.name, args.summary, args.profile, args.model_config, args.speed, args.markdown,
                               args.latex, run)
        run.log_metrics({"tables": len(written)})


def cmd_paper(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.reporting.paper import build_paper, toolchain_missing

    reason = toolchain_missing()  # before an MLflow run is opened: nothing is attempted without LaTeX
    if reason:
        raise SystemExit(f"error: {reason}")
    with tracking.stage_run(cfg, "paper") as run:
        info = build_paper(args.tex, args.out, run)
        run.log_metrics({"pdf_bytes": info["bytes"]})


def cmd_benchmark(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking

    speed = _benchmark_module("speed")
    with tracking.stage_run(cfg, "benchmark") as run:
        result = speed.run_benchmark(cfg, args.model, args.data, args.profile, args.mgs, args.out)
        log.info("benchmark rows:\n%s", speed.format_table(result))
        run.log_metrics({**{f"ffn_share.{shape}": share for shape, share in result["ffn_share"].items()},
                         **{f"speedup.{r['shape']}.{r['scope']}.{r['method']}.{r['setting']}": r["speedup"]
                            for r in result["rows"]}})
        run.log_artifact(args.out)


def _benchmark_module(name: str):
    """benchmarks/<name>.py of the project (the stage runs from the project root; else beside the package)."""
    import importlib.util

    from detr_sparsity.config import PACKAGE_ROOT

    for root in (Path.cwd(), PACKAGE_ROOT.parents[1]):
        path = root / "benchmarks" / f"{name}.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"benchmarks/{name}.py not found in {Path.cwd()} or {PACKAGE_ROOT.parents[1]}")


def _model_and_data(parser: argparse.ArgumentParser) -> None:
    """The inputs of every stage that runs the dense model: its directory and the data stage's."""
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detr_sparsity", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file")
    parser.add_argument("--log", type=Path, default=None, help="also write the log to this file")
    sub = parser.add_subparsers(dest="stage", required=True)

    sub.add_parser("validate", help="check params.yaml and exit").set_defaults(func=cmd_validate)
    sub.add_parser("init-tracking", help="create the MLflow store and experiment (once, before parallel jobs)"
                   ).set_defaults(func=cmd_init_tracking)

    p = sub.add_parser("data", help="generate or download the study's splits")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("model", help="pretrain or fetch the dense DETR")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("evaluate", help="detections, COCO AP, sparsity and FLOPs of one method")
    p.add_argument("--method", required=True)
    _model_and_data(p)
    p.add_argument("--detections", type=Path, required=True)
    p.add_argument("--row", type=Path, required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("profile", help="activation statistics of the dense model on the calibration split")
    _model_and_data(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("masking", help="top-k or random keep of k of H activations, every block alone and all")
    p.add_argument("--method", required=True, help="topk or random")
    p.add_argument("--keep-ratio", type=float, required=True, help="k / H, in (0, 1]")
    _model_and_data(p)
    p.add_argument("--detections", type=Path, required=True, help="directory for one detections file per scope")
    p.add_argument("--rows", type=Path, required=True)
    p.set_defaults(func=cmd_masking)

    p = sub.add_parser("sibs", help="static indicator-based sparsification at one threshold")
    p.add_argument("--threshold", type=float, required=True)
    _model_and_data(p)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--detections", type=Path, required=True)
    p.add_argument("--row", type=Path, required=True)
    p.set_defaults(func=cmd_sibs)

    p = sub.add_parser("mgs-cache", help="frozen front end and dense outputs of the gate-training images")
    _model_and_data(p)
    p.add_argument("--out", type=Path, required=True, help="safetensors file")
    p.set_defaults(func=cmd_mgs_cache)

    p = sub.add_parser("mgs-train", help="train MGS gates toward one induced-sparsity target, model frozen")
    p.add_argument("--objective", required=True, help="task, distillation or oracle")
    p.add_argument("--target", type=float, required=True, help="induced sparsity, in (0, 1)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="the mgs-cache output")
    p.add_argument("--gates", type=Path, required=True, help="safetensors file for the trained gates")
    p.add_argument("--training", type=Path, required=True, help="JSON record of the training")
    p.set_defaults(func=cmd_mgs_train)

    p = sub.add_parser("mgs-evaluate", help="detections, COCO AP, sparsity and FLOPs of one trained gate set")
    p.add_argument("--objective", required=True)
    p.add_argument("--target", type=float, required=True)
    _model_and_data(p)
    p.add_argument("--gates", type=Path, required=True)
    p.add_argument("--training", type=Path, required=True)
    p.add_argument("--detections", type=Path, required=True)
    p.add_argument("--row", type=Path, required=True)
    p.set_defaults(func=cmd_mgs_evaluate)

    p = sub.add_parser("summary", help="gather the row files of every configured evaluation into summary.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True, help="headline metrics per configuration (DVC metrics)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("benchmark", help="measured speed of sparse FFN execution (SIBS, MGS) against dense")
    _model_and_data(p)
    p.add_argument("--profile", type=Path, required=True, help="the profile stage's output (SIBS indicators)")
    p.add_argument("--mgs", type=Path, required=True, help="directory of the gate sets, <objective>/<target>/")
    p.add_argument("--out", type=Path, required=True, help="speed.json")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("figures", help="the study's figures (PDF + PNG) and captions, from summary.json")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--profile", type=Path, required=True, help="the profile stage's profile.json")
    p.add_argument("--speed", type=Path, help="the benchmark stage's speed.json (the speed figure)")
    p.add_argument("--out", type=Path, required=True, help="figure directory (paper/figures)")
    p.add_argument("--plots", type=Path, required=True, help="CSV series for dvc plots")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("tables", help="tables T1-T5 as Markdown and LaTeX, from summary.json and speed.json")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--profile", type=Path, required=True, help="the profile stage's profile.json")
    p.add_argument("--model-config", type=Path, required=True, help="the dense model's config.json")
    p.add_argument("--speed", type=Path, help="the benchmark stage's speed.json (T4's latency)")
    p.add_argument("--markdown", type=Path, required=True, help="Markdown directory (results/<study>/tables)")
    p.add_argument("--latex", type=Path, required=True, help="LaTeX directory (paper/tables)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("paper", help="build paper/main.pdf with latexmk")
    p.add_argument("--tex", type=Path, default=Path("paper/main.tex"))
    p.add_argument("--out", type=Path, default=Path("paper/main.pdf"))
    p.set_defaults(func=cmd_paper)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log)
    try:
        cfg = load_config(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage in MODEL_STAGES:
        _note_device()
    args.func(cfg, args)
    return 0


# The stages that run the detector (params.yaml's resources say which of them ask a cluster for a GPU).
MODEL_STAGES = {"model", "evaluate", "profile", "masking", "sibs", "mgs-cache", "mgs-train", "mgs-evaluate", "benchmark"}


def _note_device() -> None:
    """Say which device the job was given. The stages compute on the CPU whatever it is: none takes a device yet."""
    from detr_sparsity.device import job_device

    if job_device() == "cuda":
        log.warning("this job was given a GPU, but the stages compute on the CPU (none takes a device yet)")
