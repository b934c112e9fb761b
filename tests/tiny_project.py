"""A throwaway copy of the project with a tiny synthetic study, for end-to-end runs of the real tools."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What a checkout needs to run the pipeline (the package itself is installed in the test's venv).
PROJECT_FILES = ["Snakefile", "dvc.yaml", "params.yaml", "workflow", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 "src", "paper/main.tex"]

TINY = {
    "data": {"source": "synthetic", "splits": {"train": 16, "calibration": 4, "val": 6},
             "image_size": 96, "num_classes": 6, "min_objects": 1, "max_objects": 4, "count_decay": 0.75},
    "input": {"shortest_edge": 64, "longest_edge": 64},
    "model": {
        "source": "pretrain",
        "architecture": {"d_model": 16, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                         "attention_heads": 2, "num_queries": 8, "backbone_hidden_sizes": [8, 16],
                         "backbone_depths": [1, 1], "dropout": 0.0},
        "pretrain": {"steps": 3, "batch_size": 4, "learning_rate": 1.0e-4, "weight_decay": 0.0,
                     "warmup_steps": 1, "grad_clip": 0.1, "target_copies": 2,
                     "one_to_many_fraction": 0.5, "activation_l1": 0.5,
                     "denoising": {"groups": 0, "box_noise": 0.4, "label_noise": 0.2}, "checkpoint_every": 2},
    },
    "evaluate": {"split": "val", "batch_size": 3, "shards": 1, "front_end_memory_mb": 64},
    "mgs": {"cache": {"split": "train", "images": 8, "batch_size": 4, "tokens_per_image": 0},
            "local": {"steps": 5, "batch_tokens": 32, "learning_rate": 0.05, "pos_weight": 1.0, "held_out": 0.25},
            "training": {"steps": 4, "batch_size": 4, "learning_rate": 0.05, "multiplier_rate": 0.5,
                         "target_warmup": 0.5, "checkpoint_every": 2, "warm_start": True}},
}
# Small sweeps: keep-ratio 1.0 and threshold 0.0 must reproduce the dense row exactly.
TINY_SWEEPS = {
    "masking": {"methods": ["topk", "random"], "keep_ratios": [1.0, 0.25], "threshold_allocation": "greedy"},
    "sibs": {"indicator": "firing_frequency", "thresholds": [0.0, 0.2]},
    "mgs": {"targets": [0.5], "objectives": ["group_activity", "distillation"], "train_target": 0.5,
            "group_size": 16, "blocks": "all", "gate_threshold": 0.5, "calibration": "global",
            "single_block_targets": [0.5], "paper_setting": {"group_size": 8, "gate_threshold": 0.5}},
    # The study's own shapes only, timed once: the stage runs in seconds (timings are not checked).
    "benchmark": {"shapes": ["study"], "objective": "distillation", "threads": 1, "repeats": 1, "model_repeats": 1,
                  "warmup": 0, "detr_r50_input": {"height": 64, "width": 64}},
}


def tool_env(root: Path) -> dict[str, str]:
    """Environment for the tools: this venv first on PATH, a local MLflow store, a git identity."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
                "OMP_NUM_THREADS": "1"})
    return env


def make_tiny_project(dest: Path) -> Path:
    """Copy the project's pipeline files to `dest`, shrink the synthetic study, commit it in a new git repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, target)
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["studies"]["synthetic"] = {**TINY, "resources": params["studies"]["synthetic"]["resources"]}
    params.update(TINY_SWEEPS)
    write_params(dest, params)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "tiny study"], dest)
    return dest


def tiny_study(work: Path) -> Iterator[tuple]:
    """The tiny synthetic study's data and model, made in `work` by the real stages (`cli.run_stage`) with an MLflow
    store there; for a module fixture to `yield from`: yields (config, work) with `work` the working directory and
    the store set, and afterwards leaves the working directory and the store and clears MLflow's tracking URI."""
    # Imported here: MLflow takes seconds to import, and the other helpers here run the tools in subprocesses.
    import mlflow

    from detr_sparsity import tracking
    from detr_sparsity.cli import run_stage
    from detr_sparsity.config import load_config

    results = Path("results/synthetic")
    write_study_settings(work, tiny_params())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        cfg = load_config(work / "params.yaml")
        tracking.init_store(cfg)
        run_stage(cfg, "data", out=results / "data")
        run_stage(cfg, "model", data=results / "data", out=results / "model")
        yield cfg, work
    mlflow.set_tracking_uri(None)


def tiny_params() -> dict:
    """The project's params.yaml with the synthetic study shrunk to TINY (the sweeps as they are)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["studies"]["synthetic"] = {**TINY, "resources": params["studies"]["synthetic"]["resources"]}
    return params


def write_study_settings(work: Path, params: dict) -> None:
    """`params` as work/params.yaml, beside the schema that validates it (where load_config looks for it)."""
    write_params(work, params)
    (work / "workflow/schemas").mkdir(parents=True)
    shutil.copy(REPO / "workflow/schemas/params.schema.yaml", work / "workflow/schemas")


class Untracked:
    """What a stage's `run_stage` is handed for its MLflow run where a test calls it directly, without a store."""

    run_id, params_hash = "run", "hash"

    def log_metrics(self, *args, **kwargs) -> None:
        pass

    def log_artifact(self, *args, **kwargs) -> None:
        pass


def untracked_study(work: Path, params: dict):
    """`params` written in `work`, and the study's data and model made there by the real stages without MLflow;
    returns the loaded config (paths in it are relative to `work`)."""
    from detr_sparsity.config import load_config
    from detr_sparsity.stages import data as data_stage
    from detr_sparsity.stages import model as model_stage

    write_study_settings(work, params)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        cfg = load_config(work / "params.yaml")
        data_stage.run_stage(cfg, Untracked(), out=work / "data")
        model_stage.run_stage(cfg, Untracked(), data=work / "data", out=work / "model")
    return cfg


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command in `cwd` with the tool environment (plus `env`); on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env={**tool_env(cwd), **(env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(directory: Path, timeout: float = 120.0) -> Iterator[str]:
    """An `mlflow server` on 127.0.0.1 at a free port, its SQLite store and proxied artifacts under `directory`;
    yields its URL and stops it (and its workers) on exit, whatever happened."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
           "--artifacts-destination", str(directory / "artifacts")]
    with (directory / "server.log").open("w") as log:
        # Its own process group: the server forks workers, and all of them must go at the end.
        server = subprocess.Popen(cmd, cwd=directory, env=tool_env(directory), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise AssertionError(f"mlflow server exited ({server.returncode}):\n"
                                         f"{(directory / 'server.log').read_text()}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not answer within {timeout} s")
                time.sleep(0.5)
            yield url
        finally:
            stop_group(server)


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with its own session, and every process of that group."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
