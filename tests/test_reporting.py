"""The reporting stages' logic on a small hand-made record: table cells, matching, escaping, failures.
(The end-to-end tests check the generated tables and figures against a real summary.json.)"""

from __future__ import annotations

import json

import pytest

from detr_sparsity.reporting import figures, tables
from detr_sparsity.reporting.latex import latex_text
from detr_sparsity.reporting.records import StudyRecord, flops_ratio
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


@pytest.fixture
def record():
    rows = [row("dense", None, 0.30, 0.0, 100.0)]
    for keep in (1.0, 0.1):
        for method in ("topk", "random"):
            rows.append(row(method, {"keep_ratio": keep, "k": int(64 * keep), "scope": "all"},
                            0.30 if method == "topk" else 0.02, 1 - keep))
    rows += [row("sibs", {"indicator": "firing_frequency", "threshold": t}, ap, s)
             for t, ap, s in ((0.0, 0.30, 0.0), (0.1, 0.25, 0.3), (0.3, 0.05, 0.87))]
    rows += [row("mgs", {"objective": "task", "target": 0.9, "group_size": 16}, 0.21, 0.905, 12.0)]
    return StudyRecord(rows)


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
    assert "| MGS (task) | target 0.9 | 90.5 | 0.210 | 70.0 | 0.12x | 0.88x | not measured |" in text
    assert "| top-k (oracle) | keep 0.1 | 90.0 | 0.300 | 100.0 |" in text

    far = StudyRecord([r for r in record.rows if not (r["method"] == "sibs" and r["setting"]["threshold"] == 0.3)])
    assert "none within 5 points (nearest: tau 0.1 at 30.0 %)" in tables.t4_matched(far, None).markdown()


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


def test_f2_plots_topk_and_random_at_their_induced_sparsity(record):
    fig = figures.f2_topk_vs_random(record)
    assert fig.axes[0].get_title() == "all blocks"
    lines = plotted(fig.axes[0])
    # induced sparsity 1 - keep-ratio: 0 and 0.9; AP 0.30 for top-k, 0.02 for random (the record's values)
    assert lines["top-k (oracle)"] == [(0.0, 0.30), (pytest.approx(0.9), 0.30)]
    assert lines["random"] == [(0.0, 0.02), (pytest.approx(0.9), 0.02)]
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
