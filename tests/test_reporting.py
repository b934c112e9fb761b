"""The reporting stages' logic on a small hand-made record: table cells, matching, escaping, failures.
(The end-to-end tests check the generated tables and figures against a real summary.json.)"""

from __future__ import annotations

import csv
import json
import math

import pytest

from detr_sparsity.reporting import figures, tables
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
    assert "| 0.9 | 0 | none | 120.0 | 3.2 | calibration |" in cost
    assert "| 0.9 |  |  |  |  |  |" in cost  # the old task row records no cost: blank, not invented
    # encoder.0 at 0.85: comparisons.json's interval; decoder.0: summary.json's AP / dense AP alone
    assert "| encoder.0 | 84.0 | 0.295 | 98.3 [95.0, 101.0] | +0.5 [-1.0, +2.0] |  | yes |" in single
    assert "| decoder.0 | 82.0 | 0.300 | 100.0 |  |  | no |" in single

    # Recounted by hand from SINGLE: holds where AP / 0.30 >= 0.97 and the block's sparsity >= 0.83.
    #   0.85: encoder.0 (0.983, 0.84) yes; decoder.0 (1.0, 0.82) no, too few zeros  -> 1 of 2
    #   0.9:  encoder.0 (0.95, 0.90) no, AP;  decoder.0 (0.98, 0.91) yes            -> 1 of 2
    #   at one target or more: encoder.0 and decoder.0                              -> 2 of 2
    by_hand = {t: sum(ap / 0.30 >= 0.97 and s >= 0.83 for _, tt, s, ap in SINGLE if tt == t) for t in (0.85, 0.9)}
    assert by_hand == {0.85: 1, 0.9: 1}
    assert tables.claim_counts(record, comparisons) == {0.85: (1, 2), 0.9: (1, 2)}
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
    written = tables.write_tables(markdown, latex, "x", record, profile, model_config, None, comparisons)
    assert written == ["t1_dense", "t2_sibs", "t3_mgs", "t4_matched"]
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
