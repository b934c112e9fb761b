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

    with tracking.stage_run(cfg, "evaluate", setting=_shard_setting(args, {"method": args.method})) as run:
        evaluate(cfg, args.method, args.model, args.data, args.detections, args.row, run, args.sharding)


def cmd_profile(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.profile import profile_stage

    with tracking.stage_run(cfg, "profile") as run:
        profile_stage(cfg, args.model, args.data, args.out, run)


def cmd_masking(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.masking import masking_stage

    setting = _shard_setting(args, {"method": args.method, "keep_ratio": args.keep_ratio})
    with tracking.stage_run(cfg, "masking", setting=setting) as run:
        masking_stage(cfg, args.method, args.keep_ratio, args.model, args.data, args.detections, args.rows, run,
                      args.sharding)


def cmd_sibs(cfg: StudyConfig, args) -> None:
    from detr_sparsity import tracking
    from detr_sparsity.sparsity.sibs import sibs_stage

    with tracking.stage_run(cfg, "sibs", setting=_shard_setting(args, {"threshold": args.threshold})) as run:
        sibs_stage(cfg, args.threshold, args.model, args.data, args.profile, args.detections, args.row, run,
                   args.sharding)


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

    setting = _shard_setting(args, {"objective": args.objective, "target": args.target})
    with tracking.stage_run(cfg, "mgs_evaluate", setting=setting) as run:
        mgs_evaluate_stage(cfg, args.objective, args.target, args.model, args.data, args.gates, args.training,
                           args.detections, args.row, run, args.sharding)


def _shard_setting(args, setting: dict) -> dict:
    """A shard job's MLflow run is named after its shard too; the gather job's run is the evaluation's run."""
    if args.sharding.detects_shard:
        return {**setting, "shard": f"{args.sharding.index}/{args.sharding.count}"}
    return setting


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


def _evaluation_outputs(parser: argparse.ArgumentParser, detections_help: str, rows: str = "--row") -> None:
    """The outputs of an evaluation stage, and how it shares the split (evaluation.shards)."""
    parser.add_argument("--detections", type=Path, required=True, help=detections_help)
    parser.add_argument(rows, type=Path, help="required, except for a shard job (--shard), which writes no rows")
    sharding = parser.add_mutually_exclusive_group()
    sharding.add_argument("--shard", metavar="K/N",
                          help="detect only shard K of N of the split's batches; --detections then receives the "
                               "shard's partial evaluation (detections and counts) for the gather job")
    sharding.add_argument("--gather", type=Path, nargs="+", metavar="SHARD",
                          help="merge these shard jobs' --detections outputs (in shard order) instead of detecting, "
                               "then score and write as an unsharded job does")


def _sharding(args, parser: argparse.ArgumentParser) -> None:
    """args.sharding from --shard / --gather; refuses what cannot work before any work."""
    from detr_sparsity.evaluation.shards import WHOLE_SPLIT, Sharding, parse_shard

    rows = args.rows if hasattr(args, "rows") else args.row
    try:
        if args.shard:
            args.sharding = parse_shard(args.shard)
        elif args.gather:
            args.sharding = Sharding(gather=tuple(args.gather), output=args.detections)
        else:
            args.sharding = WHOLE_SPLIT
    except ValueError as err:
        parser.error(str(err))
    if rows is None and not args.sharding.detects_shard:
        parser.error("--row/--rows is required, except for a shard job (--shard K/N with N > 1)")
    if args.gather:
        missing = [str(p) for p in args.gather if not p.exists()]
        if missing:
            parser.error(f"--gather: no partial evaluation at {', '.join(missing)} (run the shard jobs first)")


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
    _evaluation_outputs(p, "COCO results JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("profile", help="activation statistics of the dense model on the calibration split")
    _model_and_data(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("masking", help="top-k or random keep of k of H activations, every block alone and all")
    p.add_argument("--method", required=True, help="topk or random")
    p.add_argument("--keep-ratio", type=float, required=True, help="k / H, in (0, 1]")
    _model_and_data(p)
    _evaluation_outputs(p, "directory for one detections file per scope", rows="--rows")
    p.set_defaults(func=cmd_masking)

    p = sub.add_parser("sibs", help="static indicator-based sparsification at one threshold")
    p.add_argument("--threshold", type=float, required=True)
    _model_and_data(p)
    p.add_argument("--profile", type=Path, required=True)
    _evaluation_outputs(p, "COCO results JSON")
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
    _evaluation_outputs(p, "COCO results JSON")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "gather"):
        _sharding(args, parser)
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


# The stages that run the detector on the job's device (params.yaml's resources say which ask a cluster for a GPU).
MODEL_STAGES = {"model", "evaluate", "profile", "masking", "sibs", "mgs-cache", "mgs-train", "mgs-evaluate"}


def _note_device() -> None:
    """Say which device the job computes on (a bad DETR_SPARSITY_DEVICE fails here, before any work)."""
    from detr_sparsity.device import job_device

    log.info("computing on %s", job_device())
