"""Every error the README or a docstring promises is triggered here: the message names the file or the value, and
no output that looks complete is left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_sparsity.atomic import atomic_dir, atomic_path, write_json
from detr_sparsity.evaluation.coco_eval import coco_ap
from detr_sparsity.evaluation.shards import gather_partials, parse_shard, read_partial
from detr_sparsity.reporting.paper import build_paper
from detr_sparsity.reporting.summary import read_rows
from detr_sparsity.sparsity.sibs import reproduced

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detr_sparsity", *args], cwd=cwd, capture_output=True, text=True)


# ---------------------------------------------------------------- atomic writes

def test_an_interrupted_atomic_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = tmp_path / "row.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"AP": 0.5')  # half written
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    directory = tmp_path / "figures"
    directory.mkdir()
    (directory / "f1.png").write_bytes(b"the previous run's figure")
    with pytest.raises(RuntimeError):
        with atomic_dir(directory) as tmp:
            (tmp / "f1.png").write_bytes(b"half")
            raise RuntimeError("drawing failed")
    # the previous complete output stays; nothing half-written replaces it, no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]
    assert (directory / "f1.png").read_bytes() == b"the previous run's figure"


# ---------------------------------------------------------------- evaluation

def test_an_empty_detections_file_is_refused_naming_it(tmp_path):
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps({"images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}],
                                       "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 4, 4],
                                                        "area": 16, "iscrowd": 0}],
                                       "categories": [{"id": 0, "name": "disc"}]}))
    detections = tmp_path / "detections.json"
    detections.write_text("[]")
    with pytest.raises(ValueError, match=f"{detections} holds no detections"):
        coco_ap(annotations, detections)


def test_a_row_file_missing_a_field_is_refused_naming_the_file_and_the_field(tmp_path):
    row = {"method": "dense", "setting": None, "AP": 0.1}
    path = tmp_path / "row.json"
    write_json(path, row)
    with pytest.raises(ValueError, match=f"row file {path} lacks field\\(s\\) AP50, AP75"):
        read_rows([path])


def test_a_shrunk_ffn_that_misses_the_masked_detections_fails_the_sibs_job():
    check = {"detections": 1000, "label_mismatches": 0, "max_score_difference": 0.0, "max_box_difference_px": 0.0}
    assert reproduced(check, 0.2) == check
    for bad in ({"label_mismatches": 2}, {"max_score_difference": 2e-4}, {"max_box_difference_px": 0.06}):
        with pytest.raises(RuntimeError, match="does not reproduce the masked detections at threshold 0.2"):
            reproduced({**check, **bad}, 0.2)


# ---------------------------------------------------------------- shards

def test_bad_shards_and_partials_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shard 0/3 is not allowed: the shard must be in 1..3"):
        parse_shard("0/3")
    not_partial = tmp_path / "detections.json"
    not_partial.write_text("[]")
    with pytest.raises(ValueError, match=f"{not_partial} is not a shard's partial evaluation"):
        read_partial(not_partial)

    class Blocks:
        blocks = {"encoder.0": None}

    partial = tmp_path / "1-of-2.json"
    write_json(partial, {"format": "detr-sparsity partial evaluation v1", "detections": [], "images": 0,
                         "module_flops": {}, "ffn_counts": {"decoder.5": {}}, "attached": {}})
    with pytest.raises(ValueError, match=f"{partial} counts blocks \\['decoder.5'\\], the model has \\['encoder.0'\\]"):
        gather_partials([partial], object(), Blocks())


def test_gather_with_a_missing_partial_is_refused_before_any_work(tmp_path):
    missing = tmp_path / "shards" / "2-of-2" / "detections.json"
    done = run_cli("evaluate", "--method", "dense", "--model", "m", "--data", "d", "--detections",
                   str(tmp_path / "detections.json"), "--row", str(tmp_path / "row.json"), "--gather", str(missing))
    assert done.returncode == 2
    assert f"--gather: no partial evaluation at {missing} (run the shard jobs first)" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_shard_job_needs_no_row_and_other_jobs_need_one(tmp_path):
    done = run_cli("sibs", "--threshold", "0.1", "--model", "m", "--data", "d", "--neurons", "n",
                   "--detections", str(tmp_path / "d.json"))
    assert done.returncode == 2 and "--row is required, except for a shard job" in done.stderr


# ---------------------------------------------------------------- MGS records

def test_a_training_record_that_does_not_match_its_gates_is_refused(tmp_path, monkeypatch):
    from detr_sparsity.config import load_config
    from detr_sparsity.stages import mgs_evaluate

    training = tmp_path / "training.json"
    write_json(training, {"objective": "task", "target": 0.8})
    cfg = load_config(REPO / "params.yaml")
    with pytest.raises(ValueError, match=f"{training} records task gates for target 0.8, not distillation gates "
                                         f"for 0.9"):
        mgs_evaluate.run_stage(cfg, tracked=None, objective="distillation", target=0.9, model=tmp_path / "m",
                               data=tmp_path / "d", gates=tmp_path / "g", training=training,
                               detections=tmp_path / "det.json", row=tmp_path / "row.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.json"]


def test_gate_training_that_changed_the_dense_weights_is_refused(tmp_path, monkeypatch):
    """The frozen-weights check of stage `mgs_train`: a training that touched the DETR leaves no gates."""
    from detr_sparsity.config import load_config
    from detr_sparsity.models.small_detr import build_small_detr, small_detr_config
    from detr_sparsity.stages import mgs_train

    torch.manual_seed(0)
    arch = {"d_model": 16, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2,
            "num_queries": 4, "backbone_hidden_sizes": [8, 16], "backbone_depths": [1, 1], "dropout": 0.0}
    model_dir = tmp_path / "model"
    build_small_detr(small_detr_config(arch, [{"id": 0, "name": "disc"}])).save_pretrained(model_dir)

    def tampering_training(model, gates, cache, settings, seed, checkpoint, log_step):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # a training that forgot to freeze the DETR
        return {"curve": [], "steps": 1, "train_seconds": 0.0, "induced_sparsity": 0.5}

    monkeypatch.setattr(mgs_train, "train_gates", tampering_training)
    monkeypatch.setattr(mgs_train.FrontEndCache, "load", classmethod(lambda cls, path: [None] * 4))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "params.yaml")
    assert "distillation" in cfg.mgs["objectives"]
    cfg.gate_training["training"] = {**cfg.gate_training["training"], "warm_start": False}

    class Tracked:
        run_id, params_hash = "run", "hash"

        def log_metrics(self, *args, **kwargs):
            pass

    out = tmp_path / "trained"
    with pytest.raises(RuntimeError, match="gate training changed the dense model's weights"):
        mgs_train.run_stage(cfg, Tracked(), model=model_dir, cache=tmp_path / "c", local=tmp_path / "l", out=out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results"]  # and no temporary left


# ---------------------------------------------------------------- the paper

def test_a_failed_latexmk_names_its_log_and_leaves_no_pdf(tmp_path, monkeypatch):
    """A LaTeX error: the stage fails naming latexmk's log, and no PDF that looks current is left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, script in {"latexmk": "echo '! Undefined control sequence.'; exit 12",
                         "pdflatex": "echo 'pdfTeX 3.14'"}.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    study = tmp_path / "paper" / "synthetic"
    study.mkdir(parents=True)
    tex = tmp_path / "paper" / "main.tex"
    tex.write_text("\\documentclass{article}\\begin{document}\\undefined\\end{document}\n")
    pdf = study / "main.pdf"
    with pytest.raises(RuntimeError, match=r"latexmk failed on .*main.tex \(exit 12\); see .*\.build/main.log"):
        build_paper(tex, pdf)
    assert not pdf.exists()


def test_the_paper_without_latex_is_refused_before_any_run(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # python only: no latexmk, no pdflatex
    done = subprocess.run([sys.executable, "-m", "detr_sparsity", "paper", "--tex", "paper/main.tex",
                           "--figures", "f", "--tables", "t", "--pdf", str(tmp_path / "main.pdf")], cwd=REPO,
                          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                          capture_output=True, text=True)
    assert done.returncode == 1 and "no LaTeX toolchain" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no MLflow store opened, no PDF
