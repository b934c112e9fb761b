"""The reporting stages' logic on a small hand-made record: table cells, matching, escaping, failures.
(The end-to-end tests check the generated tables and figures against a real summary.json.)"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from detr_sparsity.reporting import claims, figures, reported, tables
from detr_sparsity.reporting.latex import latex_text
from detr_sparsity.reporting.records import Comparisons, StudyRecord, flops_ratio
from detr_sparsity.reporting.summary import headline_metrics

BLOCKS = ["encoder.0", "decoder.0"]


def row(method, setting, ap, induced, ffn_as_run=50.0):
    per_block = {b: induced for b in BLOCKS}
    return {"method": method, "setting": setting, "AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": -1.0, "APm": ap,
            "APl": ap, "images": 10,
            "natural_sparsity": {"overall": 0.7, "encoder": 0.6, "decoder": 0.8,
                                 "per_block": {"encoder.0": 0.6, "decoder.0": 0.8}},
            "induced_sparsity": {"overall": induced, "encoder": induced, "decoder": induced, "per_block": per_block},
            "ffn_flops": {"dense": 100.0, "as_run": ffn_as_run}, "total_flops": {"dense": 400.0, "as_run": 350.0},
            "gates": f"results/x/mgs/{setting.get('objective')}/{setting.get('target')}/gates.safetensors"
            if method == "mgs" else None}


# The single-block rows: (block, target, that block's induced sparsity, AP); dense AP 0.30.
SINGLE = [("encoder.0", 0.85, 0.84, 0.295), ("decoder.0", 0.85, 0.82, 0.30),
          ("encoder.0", 0.9, 0.90, 0.285), ("decoder.0", 0.9, 0.91, 0.294)]


def single_row(block, target, block_sparsity, ap):
    found = row("mgs", {"objective": "group_activity", "target": target, "protocol": "single", "scope": block,
                        "blocks": [block], "group_size": 16, "gate_threshold": 0.5}, ap, block_sparsity / 2, 90.0)
    found["induced_sparsity"]["per_block"] = {b: block_sparsity if b == block else 0.0 for b in BLOCKS}
    return found


@pytest.fixture
def record():
    rows = [row("dense", None, 0.30, 0.0, 100.0)]
    for keep in (1.0, 0.1):
        for method in ("topk", "random"):
            rows.append(row(method, {"keep_ratio": keep, "k": int(64 * keep), "scope": "all"},
                            0.30 if method == "topk" else 0.02, 1 - keep))
        # the threshold oracle: no k, its calibration instead
        rows.append(row("threshold", {"keep_ratio": keep, "scope": "all", "target": round(1 - keep, 12),
                                      "thresholds": {b: keep for b in BLOCKS},
                                      "calibration_sparsity": {b: 1 - keep for b in BLOCKS}},
                        0.30 if keep == 1.0 else 0.28, 1 - keep))
    rows += [row("sibs", {"indicator": "firing_frequency", "threshold": t}, ap, s)
             for t, ap, s in ((0.0, 0.30, 0.0), (0.1, 0.25, 0.3), (0.3, 0.05, 0.87))]
    # an MGS row written before the protocols existed: no protocol, no scope (read as every block at once)
    rows += [row("mgs", {"objective": "task", "target": 0.9, "group_size": 16}, 0.21, 0.905, 12.0)]
    ga = row("mgs", {"objective": "group_activity", "target": 0.9, "group_size": 16, "gate_threshold": 0.5,
                     "blocks": BLOCKS, "protocol": "all", "scope": "all"}, 0.24, 0.9, 14.0)
    ga["training"] = {"steps": 0, "train_seconds": 0.0, "local_train_seconds": 120.0, "calibration_seconds": 3.25,
                      "calibration": {"split": "calibration", "seconds": 3.25}, "mlflow_run_id": "r"}
    rows.append(ga)
    rows += [single_row(*spec) for spec in SINGLE]
    return StudyRecord(rows)


def interval(point, low, high, metric="AP_ratio"):
    return {metric: point, f"{metric}_low": low, f"{metric}_high": high}


@pytest.fixture
def comparisons():
    """A small comparisons.json as the summary stage writes it (descriptors as `reporting.comparisons.describe`)."""
    ga = {"method": "mgs", "objective": "group_activity", "protocol": "all", "target": 0.9, "scope": "all"}
    alone = {"method": "mgs", "objective": "group_activity", "protocol": "single", "target": 0.85,
             "scope": "encoder.0"}
    dense = {"method": "dense"}
    found = [
        {"kind": "retention", "row": ga, "reference": dense, **interval(0.8, 0.75, 0.851)},
        {"kind": "retention", "row": {"method": "mgs", "objective": "task", "target": 0.9}, "reference": dense,
         **interval(0.7, 0.6, 0.8)},
        {"kind": "retention", "row": {"method": "threshold", "target": 0.9, "scope": "all", "keep_ratio": 0.1},
         "reference": dense, **interval(0.28 / 0.30, 0.9, 0.97)},
        {"kind": "against_oracle", "row": ga, "reference": {"method": "threshold", "target": 0.9, "scope": "all",
                                                            "keep_ratio": 0.1},
         **interval(-0.04, -0.061, -0.02, "AP_difference")},
        {"kind": "against_oracle", "row": ga, "reference": {"method": "topk", "scope": "all", "keep_ratio": 0.1},
         **interval(-0.06, -0.08, -0.041, "AP_difference")},
        {"kind": "retention", "row": alone, "reference": dense, **interval(0.295 / 0.30, 0.95, 1.01)},
        {"kind": "against_oracle", "row": alone, "reference": {"method": "threshold", "target": 0.85,
                                                               "scope": "encoder.0", "keep_ratio": 0.15},
         **interval(0.005, -0.01, 0.02, "AP_difference")},
    ]
    return Comparisons.of({"level": 0.95, "resamples": 200, "seed": 0, "images": 10, "detections": [],
                           "comparisons": found})


def test_numbers_are_rounded_only_for_reading():
    assert tables.ap(0.28749) == "0.287" and tables.ap(-1.0) == "n/a"
    assert tables.pct(0.9056) == "90.6" and tables.times(0.1349) == "0.13x"


def test_latex_cells_escape_specials_and_typeset_times_and_arrows():
    assert latex_text("AP retained (%)") == r"AP retained (\%)"
    assert latex_text("0.63x") == r"0.63$\times$"
    assert latex_text("FFN FLOPs (x dense)") == r"FFN FLOPs ($\times$ dense)"
    assert latex_text("12.0 -> 8.0 ms") == r"12.0 $\rightarrow$ 8.0 ms"
    assert latex_text("firing_frequency & tau") == r"firing\_frequency \& $\tau$"


def test_t4_matches_sibs_within_tolerance_and_says_so_when_none_is(record):
    t4 = tables.t4_matched(record, None)
    text = t4.markdown()
    # SIBS at 0.87 lies 3 points from the 0.9 target: shown as matched.
    assert "| SIBS | tau 0.3 | 87.0 | 0.050 |" in text
    # accuracy, then cost: without comparisons.json, AP retained alone and no difference against the oracles
    assert "| MGS (task) | target 0.9 | 90.5 | 0.210 | 70.0 |  |  |" in text
    assert "| MGS (task) | target 0.9 | 90.5 | 0.12x | 0.88x | not measured |" in text
    assert "| top-k (oracle) | keep 0.1 | 90.0 | 0.300 | 100.0 |" in text

    far = StudyRecord([r for r in record.rows if not (r["method"] == "sibs" and r["setting"]["threshold"] == 0.3)])
    assert "none within 5 points (nearest: tau 0.1 at 30.0 %)" in tables.t4_matched(far, None).markdown()


def test_t4_shows_the_threshold_oracle_and_mgs_against_both_oracles_with_intervals(record, comparisons):
    t4 = tables.t4_matched(record, None, comparisons)
    accuracy, cost = (part.markdown() for part in t4.parts)
    assert accuracy.splitlines()[0] == ("| method | setting | induced sparsity (%) | AP | AP retained (%) [95 % CI] | "
                                        "AP - threshold (points) | AP - top-k (points) |")
    # 0.8 of dense [0.75, 0.851]; AP - threshold -0.04 [-0.061, -0.02] and AP - top-k -0.06 [-0.08, -0.041] in
    # points of AP
    assert ("| MGS (group_activity) | target 0.9 | 90.0 | 0.240 | 80.0 [75.0, 85.1] | -4.0 [-6.1, -2.0] | "
            "-6.0 [-8.0, -4.1] |") in accuracy
    assert "| threshold (oracle) | keep 0.1 | 90.0 | 0.280 | 93.3 [90.0, 97.0] |  |  |" in accuracy
    assert "| MGS (task) | target 0.9 | 90.5 | 0.210 | 70.0 [60.0, 80.0] |  |  |" in accuracy  # an old row
    assert "| top-k (oracle) | keep 0.1 | 90.0 | 0.300 | 100.0 |  |  |" in accuracy  # no interval computed
    methods = [line.split(" | ")[0] for line in accuracy.splitlines()[3:]]
    assert methods[:3] == ["| top-k (oracle)", "| threshold (oracle)", "| random"]
    assert "| threshold (oracle) | keep 0.1 | 90.0 | 0.50x | 0.88x | reference, not run |" in cost
    assert "| top-k (oracle) | keep 0.1 | 90.0 | 0.50x | 0.88x | reference, not run |" in cost
    assert "paired 95 % bootstrap interval over the 10 evaluation images (200 resamples" in t4.note
    latex = t4.latex()
    assert r"80.0 [75.0, 85.1] & -4.0 [-6.1, -2.0]" in latex and r"AP retained (\%) [95 \% CI]" in latex


def test_intervals_are_written_with_their_point_and_degrade_where_undefined():
    assert tables.with_interval(0.812, 0.77, 0.8514, tables.pct) == "81.2 [77.0, 85.1]"
    assert tables.with_interval(0.005, -0.01, 0.02, tables.points) == "+0.5 [-1.0, +2.0]"
    assert tables.with_interval(0.5, math.nan, math.nan, tables.pct) == "50.0"
    assert tables.with_interval(math.nan, 0.1, 0.2, tables.pct) == "n/a"
    assert tables.seconds(0.0) == "none" and tables.seconds(3.25) == "3.2" and tables.seconds(None) == ""


def test_t3_shows_both_protocols_the_cost_and_counts_the_blocks_where_the_paper_claim_holds(record, comparisons):
    t3 = tables.t3_mgs(record, comparisons)
    every, cost, single = (part.markdown() for part in t3.parts)
    assert "| 0.9 | 90.0 | 90.0 | 90.0 | 0.240 |" in every and "**MGS (group_activity): every gated block at once**" \
        in every
    assert "**MGS (task): every gated block at once**" in every  # the old row without a protocol
    # group_activity: no end-to-end training, 120 s of layer-local training (shared), 3.25 s of calibration
    assert "| 0.9 |  | 0 | none | 120.0 | 3.2 | calibration |" in cost
    assert "| 0.9 |  |  |  |  |  |  |" in cost  # the old task row records no cost: blank, not invented
    # encoder.0 at 0.85: comparisons.json's interval; decoder.0: summary.json's AP / dense AP alone
    assert "| encoder.0 | 84.0 | 0.295 | 98.3 [95.0, 101.0] | +0.5 [-1.0, +2.0] |  | yes |" in single
    assert "| decoder.0 | 82.0 | 0.300 | 100.0 |  |  | no |" in single

    # Recounted by hand from SINGLE: holds where AP / 0.30 >= 0.97 and the block's sparsity >= 0.83.
    #   0.85: encoder.0 (0.983, 0.84) yes; decoder.0 (1.0, 0.82) no, too few zeros  -> 1 of 2
    #   0.9:  encoder.0 (0.95, 0.90) no, AP;  decoder.0 (0.98, 0.91) yes            -> 1 of 2
    #   at one target or more: encoder.0 and decoder.0                              -> 2 of 2
    by_hand = {t: sum(ap / 0.30 >= 0.97 and s >= 0.83 for _, tt, s, ap in SINGLE if tt == t) for t in (0.85, 0.9)}
    assert by_hand == {0.85: 1, 0.9: 1}
    assert claims.single_block_counts(record, comparisons) == {0.85: (1, 2), 0.9: (1, 2)}
    assert "**single block, target 0.85: the paper's per-layer claim holds in 1 of 2 blocks**" in single
    assert "it holds in 1 of 2 blocks at target 0.85; 1 of 2 blocks at target 0.9; at one target or more in 2 of " \
        "2 blocks" in t3.note
    assert r"\toprule" in t3.latex() and "holds in 1 of 2 blocks" in t3.latex()


def test_t3_without_single_block_rows_says_so(record):
    plain = StudyRecord([r for r in record.rows if r["setting"] is None or r["setting"].get("protocol") != "single"])
    t3 = tables.t3_mgs(plain, Comparisons.of(None))
    assert len(t3.parts) == 2 and "No block was gated alone" in t3.note


def test_t4_latency_comes_from_the_benchmark_and_a_loss_is_shown(record):
    speed = {"threads": 2, "repeats": 5, "rows": [
        {"shape": "study", "scope": "model", "method": "mgs", "setting": "0.9", "objective": "task",
         "dense_ms": 20.0, "sparse_ms": 25.0, "speedup": 0.8},
        {"shape": "study", "scope": "model", "method": "sibs", "setting": "0.3", "objective": None,
         "dense_ms": 20.0, "sparse_ms": 16.0, "speedup": 1.25}]}
    text = tables.t4_matched(record, speed).markdown()
    assert "20.0 -> 25.0 ms (0.80x), no gain" in text
    assert "20.0 -> 16.0 ms (1.25x) |" in text
    assert "median of 5 runs with 2 CPU threads" in text


def test_t5_shows_every_measured_point_and_flags_the_ones_without_gain():
    def timed(shape, scope, method, setting, speedup, objective=None):
        return {"shape": shape, "scope": scope, "method": method, "setting": setting, "objective": objective,
                "induced_sparsity": 0.9, "dense_ms": 10.0, "sparse_ms": 10.0 / speedup, "speedup": speedup,
                "flops_speedup": 8.0, "fraction_of_theoretical": speedup / 8.0, "amdahl_ceiling_at_sparsity": 1.2}
    speed = {"threads": 2, "repeats": 9, "model_repeats": 5, "warmup": 2,
             "ffn_share": {"study": 0.2, "detr-r50": 0.08}, "amdahl_ceiling": {"study": 1.25, "detr-r50": 1.09},
             "model_inputs": {"study": {"images": 16, "height": 128, "width": 128}},
             "rows": [timed("detr-r50", "encoder", "mgs", "0.9", 3.0, "distillation"),
                      timed("detr-r50", "model", "mgs", "0.9", 0.97, "distillation"),
                      timed("study", "encoder", "sibs", "0.0", 0.9)]}
    text = tables.t5_speed(speed).markdown()
    assert text.index("study shapes: FFN share of dense model time 20.0 %, Amdahl ceiling 1.25x") < \
        text.index("detr-r50 shapes")
    assert "| MGS (distillation) | target 0.9 | 90.0 | 3.00x of 8.00x (37.5 %) |  | 0.97x of 8.00x (12.1 %), no gain |" \
        in text
    assert "| SIBS | tau 0 |  | 0.90x of 8.00x (11.2 %), no gain |" in text


def test_headline_metrics_nest_by_method_and_setting(record):
    found = headline_metrics(record.rows)
    assert found["mgs"]["task"]["target=0.9"] == {"AP": 0.21, "AP50": 0.42, "induced_sparsity": 0.905,
                                                  "ffn_flops_ratio": 0.12}
    assert found["topk"]["keep=0.1"]["AP"] == 0.30 and found["sibs"]["tau=0.3"]["AP"] == 0.05
    assert flops_ratio(record.mgs("task")[0], "total_flops") == 350.0 / 400.0


def test_captions_name_the_study_and_become_latex_macros(tmp_path):
    found = figures.captions("coco", "calibration", "val")
    assert all("coco study" in text for text in found.values())
    figures.write_captions(tmp_path, {k: found[k] for k in ("f1_natural_sparsity", "f3_flops_vs_ap")})
    tex = (tmp_path / "captions.tex").read_text()
    assert r"\newcommand{\captionFOne}{Natural sparsity" in tex and r"\captionFThree" in tex
    assert "%" not in tex.split("\n", 1)[1].replace(r"\%", "")  # every percent sign escaped


def test_a_record_without_one_dense_row_is_refused(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps([row("sibs", {"indicator": "firing_frequency", "threshold": 0.1}, 0.2, 0.3)]))
    with pytest.raises(ValueError, match="0 dense rows"):
        StudyRecord.load(path).dense


def plotted(ax) -> dict[str, list[tuple[float, float]]]:
    """Every labelled line of one panel: its (x, y) points, as matplotlib holds them."""
    return {line.get_label(): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_f3_plots_each_method_at_its_own_flops_reduction_and_ap(record):
    """F3's content, read back from the drawn lines: 1 - FFN FLOPs as run / dense against AP, per row."""
    lines = plotted(figures.f3_flops_vs_ap(record).axes[0])
    # by hand from the record: dense 100/100 -> 0; SIBS and top-k 50/100 -> 0.5; MGS 12/100 -> 0.88
    assert lines["dense"] == [(0.0, 0.30)]
    assert lines["SIBS"] == [(0.5, 0.30), (0.5, 0.25), (0.5, 0.05)]
    assert lines["MGS (task)"] == [(pytest.approx(0.88), 0.21)]
    assert lines["top-k (oracle)"] == [(0.5, 0.30)]  # keep-ratio 1 (the dense check) is left out
    assert lines["threshold (oracle)"] == [(0.5, 0.28)]
    assert lines["MGS (group_activity)"] == [(pytest.approx(0.86), 0.24)]  # every block at once only


def test_f2_plots_topk_and_random_at_their_induced_sparsity(record):
    fig = figures.f2_topk_vs_random(record)
    assert fig.axes[0].get_title() == "all blocks"
    lines = plotted(fig.axes[0])
    # induced sparsity 1 - keep-ratio: 0 and 0.9; AP 0.30 for top-k, 0.02 for random (the record's values)
    assert lines["top-k (oracle)"] == [(0.0, 0.30), (pytest.approx(0.9), 0.30)]
    assert lines["random"] == [(0.0, 0.02), (pytest.approx(0.9), 0.02)]
    assert lines["threshold (oracle)"] == [(0.0, 0.30), (pytest.approx(0.9), 0.28)]
    assert "threshold (oracle)" not in plotted(fig.axes[1])  # the record holds no threshold row for one block alone
    assert lines["dense"] == [(0.0, 0.30), (1.0, 0.30)]  # the dense AP as a line across the panel


# ---------------------------------------------------------------- figures read at a glance (drawn, then read back)

def _labels(axis, minor=False):
    axis.axes.figure.canvas.draw()
    return [t.get_text() for t in (axis.get_minorticklabels() if minor else axis.get_majorticklabels())
            if t.get_text()]


def _speed(threads):
    def timed(shape, scope, method, flops, measured):
        return {"shape": shape, "scope": scope, "method": method, "setting": "0.9",
                "objective": "distillation" if method == "mgs" else None, "flops_speedup": flops, "speedup": measured}
    return {"threads": threads, "amdahl_ceiling": {"study": 1.3, "detr-r50": 1.08},
            "rows": [timed("study", "encoder", "mgs", 7.6, 3.6), timed("study", "model", "mgs", 1.25, 1.1),
                     timed("study", "encoder", "sibs", 1.1, 0.9), timed("detr-r50", "encoder", "mgs", 13.0, 5.0),
                     timed("detr-r50", "decoder", "mgs", 1.9, 1.3)]}


@pytest.mark.parametrize("threads, wording", [(1, "(1 thread)"), (2, "(2 threads)")])
def test_f6_speedups_read_as_times_and_its_legend_stays_off_the_data(threads, wording):
    figures._style()
    fig = figures.f6_speed(_speed(threads))
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _labels(axis)
            assert {"1\u00d7", "2\u00d7", "4\u00d7"} <= set(labels), labels
            assert not _labels(axis, minor=True)
        assert ax.get_ylabel().endswith(wording) and ax.get_legend() is None
    (legend,) = fig.legends
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).y1 <= min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
    figures.plt.close(fig)


def test_f4_loss_axes_read_as_plain_numbers_and_an_undrawable_panel_says_so(record):
    def training(objective, target, losses):
        return {"objective": objective, "target": target,
                "curve": [{"step": 10 * i, "induced_sparsity": 0.5, "budget": 0.5, "objective_loss": loss}
                          for i, loss in enumerate(losses)]}
    rows = record.rows + [row("mgs", {"objective": "distillation", "target": 0.9, "group_size": 16}, 0.2, 0.9, 12.0)]
    trainings = {("task", 0.9): training("task", 0.9, [7.2, 6.9, 6.83, 6.81]),
                 ("distillation", 0.9): training("distillation", 0.9, [0.0, 0.0, 0.0])}
    figures._style()
    fig = figures.f4_gate_training(StudyRecord(rows), trainings)
    task, distillation = fig.axes[2], fig.axes[3]
    assert task.get_yscale() == "log"
    labels = _labels(task.yaxis) + _labels(task.yaxis, minor=True)
    assert labels and all(label.replace(".", "").isdigit() for label in labels), labels
    assert distillation.get_yscale() == "linear"
    assert [t.get_text() for t in distillation.texts] == ["loss 0 at every step:\nnot drawn on a log scale"]
    figures.plt.close(fig)


def test_plain_numbers_have_no_exponent_where_none_is_needed():
    assert [figures._plain_number(v) for v in (6.828, 0.1, 0.05, 20.0, 1.0, 1500.0, 1e-6)] == \
        ["6.828", "0.1", "0.05", "20", "1", "1500", "1e-06"]


def test_f4_leaves_out_gate_sets_without_an_end_to_end_curve(record):
    calibrated_only = {"objective": "group_activity", "target": 0.9, "final": None, "curve": []}
    trained = {"objective": "task", "target": 0.9, "final": {"steps": 2},
               "curve": [{"step": s, "induced_sparsity": 0.8, "budget": 0.2, "objective_loss": 1.0 / (s + 1)}
                         for s in range(3)]}
    figures._style()
    fig = figures.f4_gate_training(record, {("group_activity", 0.9): calibrated_only, ("task", 0.9): trained})
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["MGS (task)"]
    figures.plt.close(fig)
    fig = figures.f4_gate_training(record, {("group_activity", 0.9): calibrated_only})
    (ax,) = fig.axes
    assert "No gate set of this study was trained end to end" in ax.texts[0].get_text()
    figures.plt.close(fig)
    assert "not drawn: group_activity" in figures.captions("x", "calibration", "val")["f4_gate_training"]


def test_f5_shows_each_block_alone_beside_every_block_at_once(record, comparisons):
    figures._style()
    fig = figures.f5_mgs_per_block(record, comparisons)
    task, group_activity, alone = fig.axes
    assert group_activity.get_title() == "MGS (group_activity), every block at once"
    assert [p.get_height() for p in group_activity.patches] == [0.9, 0.9]
    assert alone.get_title() == "MGS (group_activity), each block alone"
    # bars: target 0.85 (encoder.0, decoder.0), then 0.9; AP / dense AP, comparisons.json's point where it has one
    heights = [p.get_height() for p in alone.patches]
    assert heights == pytest.approx([0.295 / 0.30, 1.0, 0.95, 0.98])
    figures.plt.close(fig)


def test_every_figure_table_and_plot_series_is_written(record, comparisons, tmp_path):
    profile = {"split": "calibration", "images": 3, "natural_sparsity": {"overall": 0.7},
               "per_image_sparsity": {b: [0.5, 0.6, 0.7] for b in BLOCKS},
               "per_block": {b: {"natural_sparsity": 0.6, "never_firing_neurons": 0} for b in BLOCKS}}
    trainings = [{"objective": "group_activity", "target": 0.9, "final": None, "curve": []},
                 {"objective": "task", "target": 0.9, "final": None,
                  "curve": [{"step": 0, "induced_sparsity": 0.5, "budget": 0.5, "objective_loss": 1.0}]}]
    drawn = figures.write_figures(tmp_path, "x", "val", record, profile, trainings, None, comparisons)
    assert drawn == ["f1_natural_sparsity", "f2_topk_vs_random", "f3_flops_vs_ap", "f4_gate_training",
                     "f5_mgs_per_block"]
    for name in drawn:
        assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    figures.write_plot_series(record, tmp_path, ["threshold", "mgs-group_activity", "mgs-oracle"])
    with open(tmp_path / "threshold.csv") as f:
        assert [r["AP"] for r in csv.DictReader(f)] == ["0.300000", "0.280000"]
    with open(tmp_path / "mgs-group_activity.csv") as f:
        assert [r["induced_sparsity"] for r in csv.DictReader(f)] == ["0.900000"]  # every block at once only
    assert (tmp_path / "mgs-oracle.csv").read_text().strip() == "induced_sparsity,ffn_flops_reduction,AP,AP50"

    markdown, latex = tmp_path / "md", tmp_path / "tex"
    markdown.mkdir(), latex.mkdir()
    model_config = {"d_model": 64, "encoder_ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                    "num_queries": 5}
    written = tables.write_tables(markdown, latex, "x", record, profile, model_config, None, comparisons, COST)
    assert written == ["t0_claims", "t1_dense", "t2_sibs", "t3_mgs", "t4_matched", "t6_cost"]
    assert (latex / "t6_cost.tex").read_text().count(r"\\") == 4  # header, two stages, total
    assert "98.3 [95.0, 101.0]" in (markdown / "t3_mgs.md").read_text()
    assert "80.0 [75.0, 85.1]" in (latex / "t4_matched.tex").read_text()


def test_the_paper_setting_row_is_shown_in_t3_and_keyed_in_the_metrics(record):
    """The uncalibrated row in the paper's own setting (no target): its own tabular in T3, its own metrics key, and
    only a retention comparison (no oracle has its sparsity as a target)."""
    from detr_sparsity.reporting.comparisons import compared_pairs

    paper = row("mgs", {"objective": "group_activity", "protocol": "paper", "scope": "all", "target": None,
                        "group_size": 8, "gate_threshold": 0.5, "calibration": None}, 0.12, 0.6, 45.0)
    with_paper = StudyRecord([*record.rows, paper])
    text = tables.t3_mgs(with_paper, Comparisons.of(None)).markdown()
    # 60 % achieved on both blocks, AP 0.12 of the dense 0.30 = 40 %, FFN FLOPs 45 / 100
    assert "| G = 8, threshold 0.5 | 60.0 | 60.0 | 60.0 | 0.120 | 40.0 | 0.45x |" in text
    assert headline_metrics(with_paper.rows)["mgs"]["paper_setting"]["AP"] == 0.12
    assert [(kind, reference["method"]) for r, reference, kind in compared_pairs(with_paper.rows) if r is paper] == \
        [("retention", "dense")]


# ---------------------------------------------------------------- every figure and table read back against its inputs
# F3, T3 and T4 are checked above; here F1, F2 (each block's panel), F4 (its curves), F5 (its intervals), F6 (its
# points), T1, T2, T5 and the study's macros, each against numbers worked out by hand from small inputs, in
# Markdown and in LaTeX.

def markdown_rows(text: str) -> list[list[str]]:
    """Every row of the Markdown tables in `text` (headers included, separators left out) as its cells; a section
    heading is one cell, its bold stripped."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        if cells[0].startswith("**") and not any(cells[1:]):
            cells = [cells[0][2:-2]]
        rows.append(cells)
    return rows


LATEX_SPECIALS = ((r"$\times$", "x"), (r"$\rightarrow$", "->"), (r"$\tau$", "tau"), (r"\%", "%"), (r"\_", "_"),
                  (r"\&", "&"), (r"\#", "#"))


def latex_rows(text: str) -> list[list[str]]:
    """Every row of the LaTeX tabulars in `text` as its cells, the escapes undone; a \\multicolumn heading is one
    cell."""
    rows = []
    for line in text.splitlines():
        if not line.endswith(r" \\"):
            continue
        body = line[:-3]
        heading = re.fullmatch(r"\\multicolumn\{\d+\}\{l\}\{\\emph\{(.*)\}\}", body)
        cells = [heading.group(1)] if heading else body.split(" & ")
        for tex, plain in LATEX_SPECIALS:
            cells = [c.replace(tex, plain) for c in cells]
        rows.append(cells)
    return rows


def table_rows(table) -> list[list[str]]:
    """The table's rows, read from its Markdown; its LaTeX must hold the very same cells."""
    found = markdown_rows(table.markdown())
    assert latex_rows(table.latex()) == found
    return found


def t1_inputs():
    """A dense row and a profile of three blocks, listed out of model order."""
    blocks = {"decoder.0": 0.85, "encoder.1": 0.6, "encoder.0": 0.55}
    dense = row("dense", None, 0.41249, 0.0)
    dense.update({"AP50": 0.6, "AP75": 0.45, "APs": -1.0, "APm": 0.3, "APl": 0.5, "images": 7,
                  "split_note": "val2017 less 50 held-out images",
                  "ffn_flops": {"dense": 2.5e9, "as_run": 2.5e9}, "total_flops": {"dense": 8.25e9, "as_run": 8.25e9}})
    dense["natural_sparsity"] = {"overall": 0.7, "encoder": 0.575, "decoder": 0.85, "per_block": blocks}
    profile = {"split": "calibration", "images": 5, "natural_sparsity": {"overall": 0.65},
               "per_image_sparsity": {"decoder.0": [0.8, 0.8, 0.9, 1.0, 1.0], "encoder.1": [0.5] * 5,
                                      "encoder.0": [0.1, 0.2, 0.3, 0.4, 0.5]},
               "per_block": {"decoder.0": {"natural_sparsity": 0.9, "never_firing_neurons": 0},
                             "encoder.1": {"natural_sparsity": 0.5, "never_firing_neurons": 12},
                             "encoder.0": {"natural_sparsity": 0.3, "never_firing_neurons": 3}}}
    return StudyRecord([dense]), profile


def test_t1_cells_are_the_dense_row_and_the_profile():
    record, profile = t1_inputs()
    t1 = tables.t1_dense(record, profile)
    assert table_rows(t1) == [
        ["AP", "AP50", "AP75", "APs", "APm", "APl", "FFN GFLOPs", "model GFLOPs"],
        # APs -1: no small object in the split; 2.5e9 and 8.25e9 FLOPs in GFLOPs
        ["0.412", "0.600", "0.450", "n/a", "0.300", "0.500", "2.500", "8.250"],
        ["FFN block", "natural sparsity (%)", "calibration split: mean (%)", "per image: 5th-95th pct. (%)",
         "never-firing neurons"],
        # encoder first, by depth. 5th and 95th percentile of five images (linear interpolation, by hand):
        # encoder.0 0.1 + 0.2 x 0.1 = 0.12 and 0.4 + 0.8 x 0.1 = 0.48; decoder.0 0.8 and 1.0
        ["encoder.0", "55.0", "30.0", "12.0-48.0", "3"],
        ["encoder.1", "60.0", "50.0", "50.0-50.0", "12"],
        ["decoder.0", "85.0", "90.0", "80.0-100.0", "0"],
        ["all blocks", "70.0", "65.0", "", ""],
    ]
    assert t1.title == ("T1. Dense baseline: COCO AP on 7 evaluation images (not the whole of val2017: see the note) "
                        "and natural sparsity of each FFN block")
    assert t1.note.startswith("Evaluation images: val2017 less 50 held-out images. ")
    assert "on the 5 images of the calibration split" in t1.note
    latex = t1.latex()
    assert r"\label{tab:t1}" in latex and r"\caption{T1. Dense baseline" in latex
    assert r"natural sparsity (\%) & calibration split: mean (\%)" in latex


PENALISED, UNPENALISED = reported.StandIn(activation_l1=1.0), reported.StandIn(activation_l1=0.0)


def test_t1_shows_the_reported_regime_beside_a_stand_in_only():
    record, profile = t1_inputs()
    rows = table_rows(tables.t1_dense(record, profile, PENALISED))
    assert rows[2][-1] == "DETR-R50, reported (%)"
    # the reported ranges: 74-86 % for encoder blocks, 96-98 % for decoder blocks, up to 97 % over all
    assert [r[-1] for r in rows[3:]] == ["74.0-86.0", "74.0-86.0", "96.0-98.0", "up to 97.0"]
    assert "unverified" in tables.t1_dense(record, profile, PENALISED).note
    assert "reported" not in " ".join(table_rows(tables.t1_dense(record, profile))[2])  # a measured model: no column
    stand_in, measured = (figures.captions("x", "calibration", "val", s)["f1_natural_sparsity"]
                          for s in (PENALISED, None))
    assert "DETR-R50, as reported" in stand_in and "reported" not in measured


def test_a_stand_in_is_read_from_its_settings_and_its_penalty_is_said_wherever_its_sparsity_is_shown():
    pretrained = {"source": "pretrain", "pretrain": {"activation_l1": 0.3}}
    assert reported.stand_in(pretrained) == reported.StandIn(0.3)
    assert reported.stand_in({"source": "hub", "name_or_path": "facebook/detr-resnet-50"}) is None
    record, profile = t1_inputs()
    penalty = "an L1 penalty of weight 1 on its FFN activations"
    said = {"T1": lambda s: tables.t1_dense(record, profile, s).note,
            "F1": lambda s: figures.captions("x", "calibration", "val", s)["f1_natural_sparsity"],
            "T0": lambda s: claims.c1_regime(regime_profile([0.8], [0.95], 0.9), s).reference,
            "paper": lambda s: tables.study_macros("x", record, profile, MODEL_CONFIG, s)}
    for where, text in said.items():
        assert penalty in text(PENALISED), where
        assert "DETR's loss alone" in text(UNPENALISED) and "L1" not in text(UNPENALISED), where
        assert "L1" not in text(None), where
    assert r"\newcommand{\modelorigin}{loaded as published" in tables.study_macros("x", record, profile,
                                                                                  MODEL_CONFIG)


def regime_profile(encoder, decoder, overall):
    """A profile of the blocks' natural sparsity alone, as C1 reads it."""
    per_block = {**{f"encoder.{i}": v for i, v in enumerate(encoder)}, **{f"decoder.{i}": v for i, v in enumerate(decoder)}}
    return {"split": "calibration", "images": 4, "natural_sparsity": {"overall": overall},
            "per_block": {b: {"natural_sparsity": v} for b, v in per_block.items()}}


def test_c1_most_zero_and_the_regime_by_their_thresholds():
    # every block above one half: C1 holds; the regime needs encoder >= 0.75, decoder >= 0.90, overall >= 0.85
    inside = regime_profile([0.75, 0.80], [0.90, 0.97], 0.85)  # each exactly at its threshold: holds
    assert claims.c1_most_zero(inside).verdict == claims.HOLDS
    verdict = claims.c1_regime(inside, stand_in=PENALISED)
    assert verdict.verdict == claims.HOLDS and verdict.measured == (
        "encoder 75.0 % to 80.0 %; decoder 90.0 % to 97.0 %; 85.0 % over all blocks")
    assert "this stand-in" in verdict.reference
    for encoder, decoder, overall in (([0.74, 0.8], [0.9, 0.97], 0.85), ([0.8, 0.8], [0.89, 0.97], 0.86),
                                      ([0.8, 0.8], [0.9, 0.97], 0.84)):
        assert claims.c1_regime(regime_profile(encoder, decoder, overall), PENALISED).verdict == claims.FAILS
    half = regime_profile([0.5, 0.9], [0.9], 0.8)  # one block at exactly one half: not "most"
    assert claims.c1_most_zero(half).verdict == claims.FAILS
    assert claims.c1_most_zero(half).measured == "80.0 % over all blocks; 50.0 % (encoder.0) to 90.0 % (encoder.1)"
    assert "measured" in claims.c1_regime(inside, stand_in=None).reference


def test_t0_judges_c2_to_c4_on_the_hand_made_record(record, comparisons):
    verdicts = {v.claim: v for v in claims.judge(record, regime_profile([0.6], [0.8], 0.7), comparisons, PENALISED)}
    assert list(verdicts) == ["C1", "C1, regime", "C2", "C3", "C4, every block at once", "C4, one block at a time"]
    # C2: at 90 % top-k keeps 0.30 / 0.30, random 0.02 / 0.30: 93 points ahead, with every block masked
    assert verdicts["C2"].verdict == claims.HOLDS and "90 %: 100 / 7" in verdicts["C2"].measured
    # C3: SIBS keeps >= 97 % only at tau 0 (sparsity 0); top-k keeps 100 % at 90 %
    assert verdicts["C3"].verdict == claims.HOLDS
    assert "keeping 97 % of the dense AP: 0.0 %" in verdicts["C3"].measured and "90.0 %" in verdicts["C3"].reference
    # C4, every block: at 0.9 the best gate set keeps 80 % (group_activity, comparisons.json) > task's 70 %
    every = verdicts["C4, every block at once"]
    assert every.verdict == claims.FAILS and every.measured.startswith("best gate set per target, % of dense AP "
                                                                        "kept: 0.9: 80.0 % (MGS (group_activity)")
    assert "the top-k oracle keeps 0.9: 100.0 %" in every.reference
    # C4, one block: 1 of 2 blocks at each target (recounted in the T3 test): no target where every block holds
    one = verdicts["C4, one block at a time"]
    assert one.verdict == claims.FAILS and one.measured.endswith("0.85: in 1 of 2 blocks; 0.9: in 1 of 2 blocks")
    t0 = tables.t0_claims(list(verdicts.values()))
    assert [r[0] for r in table_rows(t0)[1:]] == list(verdicts) and r"\label{tab:t0}" in t0.latex()


def test_t0_verdicts_turn_with_the_rows_and_say_what_cannot_be_measured(record, comparisons):
    dense_ap = 0.30
    kept = row("mgs", {"objective": "distillation", "target": 0.85, "protocol": "all", "scope": "all"},
               0.97 * dense_ap, 0.831, 20.0)  # 97 % of dense at 83.1 %: within the 2-point tolerance
    assert claims.c4_every_block(StudyRecord([*record.rows, kept]), comparisons).verdict == claims.HOLDS
    short = row("mgs", {"objective": "distillation", "target": 0.85, "protocol": "all", "scope": "all"},
                dense_ap, 0.829, 20.0)  # dense AP but 82.9 % sparse: too short of the target
    assert claims.c4_every_block(StudyRecord([*record.rows, short]), comparisons).verdict == claims.FAILS
    # random ahead of top-k by more than a point in one block at one sparsity: C2 does not hold
    behind = [row(m, {"keep_ratio": 0.5, "scope": "encoder.0"}, ap, 0.5) for m, ap in (("topk", 0.25),
                                                                                        ("random", 0.26))]
    assert claims.c2_topk_vs_random(StudyRecord([*record.rows, *behind])).verdict == claims.FAILS
    within = [row(m, {"keep_ratio": 0.5, "scope": "encoder.0"}, ap, 0.5) for m, ap in (("topk", 0.25),
                                                                                        ("random", 0.2529))]
    assert claims.c2_topk_vs_random(StudyRecord([*record.rows, *within])).verdict == claims.HOLDS
    # a record of the dense row alone: nothing but C1 can be judged
    alone = StudyRecord([r for r in record.rows if r["method"] == "dense"])
    verdicts = claims.judge(alone, regime_profile([0.6], [0.8], 0.7), Comparisons.of(None), PENALISED)
    assert [v.verdict for v in verdicts[2:]] == [claims.UNMEASURED] * 4


def sibs_row(threshold, ap, ap50, overall, encoder, decoder, ffn_as_run, total_as_run):
    found = row("sibs", {"indicator": "mean_activation", "threshold": threshold}, ap, overall, ffn_as_run)
    found["AP50"] = ap50
    found["induced_sparsity"].update({"encoder": encoder, "decoder": decoder})
    found["total_flops"] = {"dense": 400.0, "as_run": total_as_run}
    return found


def test_t2_cells_are_each_thresholds_row():
    dense = row("dense", None, 0.30, 0.0, 100.0)
    # listed out of order: the table sorts by threshold
    record = StudyRecord([dense, sibs_row(0.2, 0.15, 0.31, 0.8, 0.85, 0.65, 22.0, 324.0),
                          sibs_row(0.05, 0.27, 0.5, 0.35, 0.4, 0.2, 64.0, 364.0)])
    t2 = tables.t2_sibs(record)
    assert table_rows(t2) == [
        ["threshold tau", "induced sparsity (%)", "encoder (%)", "decoder (%)", "AP", "AP50", "AP retained (%)",
         "FFN FLOPs (x dense)", "model FLOPs (x dense)"],
        # AP retained 0.27 / 0.30 and 0.15 / 0.30; FLOPs 64 / 100, 364 / 400 and 22 / 100, 324 / 400
        ["0.05", "35.0", "40.0", "20.0", "0.270", "0.500", "90.0", "0.64x", "0.91x"],
        ["0.2", "80.0", "85.0", "65.0", "0.150", "0.310", "50.0", "0.22x", "0.81x"],
    ]
    assert t2.title == ("T2. SIBS threshold sweep: neurons whose mean activation is below tau are skipped for every "
                        "input")
    assert t2.note.startswith("Dense AP 0.300; ")
    assert r"0.64$\times$ & 0.91$\times$ \\" in t2.latex() and r"\caption{T2. SIBS threshold sweep" in t2.latex()


# A cost.json as the cost stage writes it, cut to what T6 reads: two stages, 3 jobs, 1200 s of wall in all.
COST = {
    "stages": [{"stage": "model", "jobs": 1, "wall_seconds": 900.0, "cpu_seconds": 1710.0, "threads": [2],
                "share": 0.75},
               {"stage": "mgs_train", "jobs": 2, "wall_seconds": 300.0, "cpu_seconds": 294.0, "threads": [1],
                "share": 0.25}],
    "total": {"jobs": 3, "wall_seconds": 1200.0, "cpu_seconds": 2004.0, "threads": [1, 2], "share": 1.0},
    "machines": [{"cpu": "AMD EPYC 9B14", "instruction_set": "avx512", "cores": 2}],
    "started": "2026-12-04T23:50:00Z", "ended": "2026-12-05T00:20:00Z",
    "not_reported": {"cost": "this stage", "figures": "beside it", "tables": "after it", "paper": "after it"},
}


def test_t6_cells_are_each_stages_jobs_minutes_threads_and_share():
    t6 = tables.t6_cost(COST)
    assert table_rows(t6) == [
        ["stage", "jobs", "wall (min)", "CPU (min)", "threads per job", "share of wall (%)"],
        # 900 s = 15.0 min, 1710 s = 28.5 min; 300 s = 5.0 min, 294 s = 4.9 min; 2004 s = 33.4 min
        ["model", "1", "15.0", "28.5", "2", "75.0"],
        ["mgs_train", "2", "5.0", "4.9", "1", "25.0"],
        ["all stages", "3", "20.0", "33.4", "1, 2", "100.0"],
    ]
    # the caption names the machine and the dates of the runs (UTC), which span two days here
    assert t6.title == ("T6. What the study cost to compute, per stage: runs of 2026-12-04 to 2026-12-05 on "
                        "AMD EPYC 9B14 (avx512, 2 cores)")
    assert "Not included: cost, figures, tables, paper" in t6.note
    assert r"\label{tab:t6}" in t6.latex() and r"mgs\_train & 2 & 5.0 & 4.9 & 1 & 25.0 \\" in t6.latex()
    # runs of one day, on two machines
    one_day = {**COST, "ended": "2026-12-04T23:59:00Z",
               "machines": [*COST["machines"], {"cpu": "Intel Xeon", "instruction_set": "avx2", "cores": 16}]}
    assert tables.t6_cost(one_day).title.endswith(
        "runs of 2026-12-04 on 2 machines: AMD EPYC 9B14 (avx512, 2 cores); Intel Xeon (avx2, 16 cores)")


def test_t5_cells_are_each_measured_point_by_shape_and_setting():
    def timed(shape, scope, method, setting, speedup, flops, fraction, sparsity=None, ceiling=None):
        found = {"shape": shape, "scope": scope, "method": method, "setting": setting,
                 "objective": "distillation" if method == "mgs" else None, "speedup": speedup,
                 "flops_speedup": flops, "fraction_of_theoretical": fraction, "induced_sparsity": sparsity}
        if ceiling is not None:
            found["amdahl_ceiling_at_sparsity"] = ceiling
        return found
    speed = {"threads": 2, "repeats": 9, "model_repeats": 5, "warmup": 2,
             "ffn_share": {"study": 0.2, "detr-r50": 0.08}, "amdahl_ceiling": {"study": 1.25, "detr-r50": 1.087},
             "model_inputs": {"study": {"images": 16, "height": 128, "width": 128},
                              "detr-r50": {"images": 1, "height": 64, "width": 96}},
             # DETR-R50 first, SIBS before MGS, target 0.9 before 0.5: the table orders them
             "rows": [timed("detr-r50", "encoder", "mgs", "0.9", 3.0, 12.0, 0.25),
                      timed("study", "model", "sibs", "0.1", 1.02, 1.04, 1.02 / 1.04, 0.3),
                      timed("study", "encoder", "mgs", "0.9", 2.0, 8.0, 0.25),
                      timed("study", "model", "mgs", "0.9", 1.1, 1.25, 0.88, 0.9, 1.2),
                      timed("study", "decoder", "mgs", "0.9", 1.5, 6.0, 0.25),
                      timed("study", "model", "mgs", "0.5", 0.95, 1.1, 0.95 / 1.1, 0.5, 1.05)]}
    t5 = tables.t5_speed(speed)
    heading = ["method", "setting", "induced sparsity (%)", "encoder FFN blocks", "decoder FFN blocks", "whole model",
               "whole-model ceiling"]
    assert table_rows(t5) == [
        heading,
        ["study shapes: FFN share of dense model time 20.0 %, Amdahl ceiling 1.25x"],
        # 0.95 / 1.1 = 0.864: slower than dense
        ["MGS (distillation)", "target 0.5", "50.0", "", "", "0.95x of 1.10x (86.4 %), no gain", "1.05x"],
        ["MGS (distillation)", "target 0.9", "90.0", "2.00x of 8.00x (25.0 %)", "1.50x of 6.00x (25.0 %)",
         "1.10x of 1.25x (88.0 %)", "1.20x"],
        ["SIBS", "tau 0.1", "30.0", "", "", "1.02x of 1.04x (98.1 %)", ""],
        ["detr-r50 shapes: FFN share of dense model time 8.0 %, Amdahl ceiling 1.09x"],
        ["MGS (distillation)", "target 0.9", "", "3.00x of 12.00x (25.0 %)", "", "", ""],
    ]
    assert ("median of 9 runs per block and 5 per whole model, after 2 warm-up runs, dense and sparse interleaved in "
            "one run, 2 CPU threads") in t5.note
    assert "Whole model: study: 16 image(s) of 128x128 px; detr-r50: 1 image(s) of 64x96 px" in t5.note
    assert r"2.00$\times$ of 8.00$\times$ (25.0 \%) & 1.50$\times$ of 6.00$\times$ (25.0 \%)" in t5.latex()


def test_t3_and_t4_read_the_same_in_latex_as_in_markdown(record, comparisons):
    """T3 and T4's Markdown cells are checked above against hand-worked values; their LaTeX holds the same cells."""
    for table in (tables.t3_mgs(record, comparisons), tables.t4_matched(record, None, comparisons)):
        rows = table_rows(table)
        assert len(rows) > 10, table.name


MODEL_CONFIG = {"d_model": 256, "encoder_ffn_dim": 2048, "encoder_layers": 6, "decoder_layers": 3,
                "num_queries": 100}


def test_the_study_macros_are_the_model_and_the_splits():
    record, profile = t1_inputs()
    mgs = row("mgs", {"objective": "task", "target": 0.9, "group_size": 32, "protocol": "all", "scope": "all"},
              0.2, 0.9)
    text = tables.study_macros("coco_small", StudyRecord([*record.rows, mgs]), profile, MODEL_CONFIG)
    macros = dict(re.findall(r"\\newcommand\{\\(\w+)\}\{(.*)\}", text))
    assert macros == {"studyname": r"coco\_small", "valimages": "7", "calibrationimages": "5", "dmodel": "256",
                      "ffndim": "2048", "encoderlayers": "6", "decoderlayers": "3", "numqueries": "100",
                      "groupsize": "32", "modelorigin": "loaded as published, not trained here"}
    assert tables.study_macros("x", record, profile, MODEL_CONFIG).count(r"\newcommand{\groupsize}{none}") == 1


def test_f1_boxes_whiskers_and_means_are_the_profiles():
    record, profile = t1_inputs()
    # 21 images per block, evenly spaced: the 5th and 95th percentiles fall on images (index 1 and 19)
    profile["per_image_sparsity"] = {"encoder.0": [i / 20 for i in range(21)],
                                     "encoder.1": [0.5 + i / 40 for i in range(21)],
                                     "decoder.0": [0.9] * 21}
    figures._style()
    fig = figures.f1_natural_sparsity(record, profile)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["encoder.0", "encoder.1", "decoder.0"]
    lines = plotted(ax)
    # the profile's token-weighted means (dots) and the dense row's on the evaluation split (crosses), at 1, 2, 3
    assert lines["token-weighted mean (calibration split)"] == [(1.0, 0.3), (2.0, 0.5), (3.0, 0.9)]
    assert lines["token-weighted mean (evaluation split)"] == [(1.0, 0.55), (2.0, 0.6), (3.0, 0.85)]
    # (Q1, Q3) by hand: the 6th and 16th of 21 evenly spaced images; whiskers: the 2nd and 20th
    expected = {1: (0.25, 0.5, 0.75, 0.05, 0.95), 2: (0.625, 0.75, 0.875, 0.525, 0.975),
                3: (0.9, 0.9, 0.9, 0.9, 0.9)}
    for x, (q1, median, q3, low, high) in expected.items():
        (box,) = [p for p in ax.patches if p.get_path().vertices[:, 0].min() < x < p.get_path().vertices[:, 0].max()]
        assert sorted(set(box.get_path().vertices[:, 1])) == pytest.approx(sorted({q1, q3}))
        near = [line for line in ax.get_lines() if line.get_label().startswith("_")
                and all(abs(v - x) < 0.3 for v in line.get_xdata())]
        ys = [float(v) for line in near for v in line.get_ydata()]
        assert min(ys) == pytest.approx(low) and max(ys) == pytest.approx(high)
        widest = max(near, key=lambda line: max(line.get_xdata()) - min(line.get_xdata()))  # the median line
        assert list(widest.get_ydata()) == pytest.approx([median, median])
    assert ax.get_ylabel() == "natural sparsity (post-ReLU zeros, %)"
    fig.canvas.draw()
    assert all(t.get_text().endswith("%") for t in ax.get_yticklabels() if t.get_text())
    figures.plt.close(fig)


def test_f1_whiskers_are_t1s_percentiles_with_few_images():
    """matplotlib alone would end a whisker at the outermost image inside the percentile, short of it on 5 images."""
    record, profile = t1_inputs()
    figures._style()
    fig = figures.f1_natural_sparsity(record, profile)
    ax = fig.axes[0]
    near = [line for line in ax.get_lines() if line.get_label().startswith("_")
            and all(abs(v - 1) < 0.3 for v in line.get_xdata())]
    ys = [float(v) for line in near for v in line.get_ydata()]
    figures.plt.close(fig)
    # T1 shows encoder.0's spread as 12.0-48.0 (see test_t1_cells_are_the_dense_row_and_the_profile)
    assert (min(ys), max(ys)) == pytest.approx((0.12, 0.48))


def test_f2_block_panels_plot_the_masked_blocks_own_sparsity(record):
    rows = list(record.rows)
    for keep, ap in ((1.0, 0.30), (0.25, 0.2)):
        for method in ("topk", "random"):
            found = row(method, {"keep_ratio": keep, "k": int(64 * keep), "scope": "encoder.0"},
                        ap if method == "topk" else ap / 2, (1 - keep) / 2)
            # only encoder.0 masked: its own sparsity 1 - keep, half of that over both blocks
            found["induced_sparsity"]["per_block"] = {"encoder.0": 1 - keep, "decoder.0": 0.0}
            rows.append(found)
    figures._style()
    fig = figures.f2_topk_vs_random(StudyRecord(rows))
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["all blocks", "encoder.0", "decoder.0"]
    assert len(fig.axes) == 4 and not fig.axes[3].get_visible()  # one row of four panels, the last unused
    encoder = plotted(fig.axes[1])
    assert encoder["top-k (oracle)"] == [(0.0, 0.30), (0.75, 0.2)]
    assert encoder["random"] == [(0.0, 0.15), (0.75, 0.1)]
    assert encoder["dense"] == [(0.0, 0.30), (1.0, 0.30)]
    assert set(plotted(fig.axes[2])) == {"dense"}  # no decoder.0 sweep in this record
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["top-k (oracle)", "threshold (oracle)", "random",
                                                                   "dense"]
    figures.plt.close(fig)


def test_f4_draws_each_targets_sparsity_budget_and_loss(record):
    def training(target, sparsities, losses):
        return {"objective": "task", "target": target,
                "curve": [{"step": 10 * i, "induced_sparsity": s, "budget": 1 - 0.1 * i, "objective_loss": loss}
                          for i, (s, loss) in enumerate(zip(sparsities, losses))]}
    trainings = {("task", 0.9): training(0.9, [0.1, 0.2, 0.3], [3.0, 2.0, 1.0]),
                 ("task", 0.5): training(0.5, [0.1, 0.25, 0.35], [4.0, 2.0, 1.5])}
    figures._style()
    fig = figures.f4_gate_training(record, trainings)
    top, bottom = fig.axes  # one objective with a curve: one column
    assert top.get_title() == "MGS (task)" and bottom.get_ylabel() == "task loss"
    assert bottom.get_xlabel() == "training step" and bottom.get_yscale() == "log"
    drawn = [(line.get_label(), line.get_linestyle(), list(line.get_xdata()), list(line.get_ydata()), line.get_color())
             for line in top.get_lines()]
    # per target (ascending): its induced sparsity (solid, labelled), then 1 - budget (dashed) in the same colour
    assert [d[:4] for d in drawn] == [
        ("0.5", "-", [0, 10, 20], [0.1, 0.25, 0.35]), (drawn[1][0], "--", [0, 10, 20], pytest.approx([0, 0.1, 0.2])),
        ("0.9", "-", [0, 10, 20], [0.1, 0.2, 0.3]), (drawn[3][0], "--", [0, 10, 20], pytest.approx([0, 0.1, 0.2]))]
    assert drawn[0][4] == drawn[1][4] != drawn[2][4] == drawn[3][4]
    losses = [(list(line.get_ydata()), line.get_color()) for line in bottom.get_lines()]
    assert losses == [([4.0, 2.0, 1.5], drawn[0][4]), ([3.0, 2.0, 1.0], drawn[2][4])]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["0.5", "0.9"]
    figures.plt.close(fig)


def test_f5_draws_the_bootstrap_interval_where_comparisons_has_one(record, comparisons):
    figures._style()
    fig = figures.f5_mgs_per_block(record, comparisons)
    task, group_activity, alone = fig.axes
    assert task.get_title() == "MGS (task), every block at once"
    assert [p.get_height() for p in task.patches] == [0.905, 0.905]  # the old task row: 0.905 on both blocks
    assert task.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in alone.get_xticklabels()] == ["encoder.0", "decoder.0"]
    # two targets side by side around each block: 0.85 left of it, 0.9 right
    bars = sorted((p.get_x() + p.get_width() / 2, p.get_height()) for p in alone.patches)
    assert bars == [(-0.2, pytest.approx(0.295 / 0.30)), (0.2, pytest.approx(0.95)), (0.8, 1.0),
                    (1.2, pytest.approx(0.98))]
    # comparisons.json has an interval for encoder.0 at 0.85 only: [0.95, 1.01] at that bar
    (errors,) = alone.collections
    assert [segment.tolist() for segment in errors.get_segments()] == [[[-0.2, 0.95], [-0.2, 1.01]]]
    assert sorted(line.get_ydata()[0] for line in alone.get_lines() if not line.get_label().startswith("_nolegend"))\
        == [0.97, 1.0]  # the paper's claim and dense
    assert [t.get_text() for t in alone.get_legend().get_texts()] == ["0.85", "0.9"]
    figures.plt.close(fig)


def test_f6_places_every_measured_point_at_its_flops_and_measured_speedup():
    figures._style()
    speed = _speed(2)
    fig = figures.f6_speed(speed)
    study, r50 = fig.axes
    assert (study.get_title(), r50.get_title()) == ("study shapes", "detr-r50 shapes")
    markers = {"o": "encoder", "s": "decoder", "*": "model"}
    for ax, shape in ((study, "study"), (r50, "detr-r50")):
        assert ax.get_xscale() == ax.get_yscale() == "log"
        points = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0]), markers[line.get_marker()])
                        for line in ax.get_lines() if line.get_label().startswith("_child"))
        assert points == sorted((r["flops_speedup"], r["speedup"], r["scope"]) for r in speed["rows"]
                                if r["shape"] == shape)
        lines = plotted(ax)
        assert lines["no gain (below: slower than dense)"][0][1] == 1.0
        assert lines["Amdahl ceiling (end to end)"][0][1] == speed["amdahl_ceiling"][shape]
    # the diagonal from 1x to the largest speed-up of the panel; the axes span the smallest to the largest
    assert plotted(study)["measured = FLOPs"] == [(1.0, 1.0), (7.6, 7.6)]
    assert plotted(r50)["measured = FLOPs"] == [(1.0, 1.0), (13.0, 13.0)]
    assert study.get_xlim() == pytest.approx((0.9 / 1.15, 7.6 * 1.15))  # 0.9: SIBS's measured speed-up
    assert r50.get_xlim() == pytest.approx((1.0 / 1.15, 13.0 * 1.15))
    # each method's colour in the legend is the colour of its points
    legend = {t.get_text(): h.get_color() for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
    sibs_point = [line for line in study.get_lines() if line.get_label().startswith("_child")][2]
    mgs_point = [line for line in study.get_lines() if line.get_label().startswith("_child")][0]
    assert legend["SIBS"] == sibs_point.get_color() and legend["MGS (distillation)"] == mgs_point.get_color()
    assert legend["SIBS"] != legend["MGS (distillation)"]
    figures.plt.close(fig)


def test_write_figures_hands_each_figure_its_inputs_and_draws_f6_with_a_benchmark(record, comparisons, tmp_path,
                                                                                   monkeypatch):
    """write_figures, with saving stubbed: F4 gets the trainings by setting, F6 is drawn where speed.json exists."""
    saved, close = {}, figures.plt.close
    monkeypatch.setattr(figures.matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **_: saved.setdefault(path.stem, fig))
    monkeypatch.setattr(figures.plt, "close", lambda fig: None)
    _record, profile = t1_inputs()
    profile["per_image_sparsity"] = {b: [0.5] for b in BLOCKS}
    profile["per_block"] = {b: {"natural_sparsity": 0.5, "never_firing_neurons": 0} for b in BLOCKS}
    trainings = [{"objective": "task", "target": 0.9, "final": None,
                  "curve": [{"step": 5, "induced_sparsity": 0.4, "budget": 0.5, "objective_loss": 2.0}]}]
    drawn = figures.write_figures(tmp_path, "x", "val", record, profile, trainings, _speed(1), comparisons)
    assert drawn[-1] == "f6_speed" and set(saved) == set(drawn)
    assert plotted(saved["f4_gate_training"].axes[0])["0.9"] == [(5.0, 0.4)]
    assert saved["f6_speed"].axes[0].get_ylabel() == "measured speed-up (1 thread)"
    assert r"\newcommand{\captionFSix}{Measured speed-up" in (tmp_path / "captions.tex").read_text()
    for fig in saved.values():
        close(fig)
