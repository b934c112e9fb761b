"""The study's figures, drawn only from summary.json and the stage outputs beside it (stage `figures`).

- F1 natural sparsity of each FFN block and its spread across images (profile.json), beside DETR-R50's as reported
  on a stand-in;
- F2 top-k against random keep, with the threshold oracle: AP against induced sparsity, one panel per block and one
  for all (paper Fig. 2);
- F3 AP against FFN FLOPs reduction for dense, SIBS, every MGS target and the two oracles (paper Fig. 3);
- F4 end-to-end gate training: induced sparsity against its budget, and the objective, per step (the curves of
  stage mgs_train, one training per objective); group_activity (trained layer-locally) is left out;
- F5 MGS per block: each block's induced sparsity with every gated block at once, per objective and target (the
  gates spread the budget unevenly), beside the AP retained with each block gated alone (single-block protocol);
- F6 measured speed-up against the FLOPs speed-up (benchmark/speed.json), when the benchmark ran.

Each figure is written as vector PDF (for paper/) and PNG (for the Snakemake report and for reading), in one
style. The captions (with the study's name) are written beside them as LaTeX macros and as Markdown, from
one place. The curves of F2 and F3 are also written as CSV series for `dvc plots`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display on a pipeline machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402
import seaborn as sns  # noqa: E402

from detr_sparsity.reporting import reported  # noqa: E402
from detr_sparsity.reporting.latex import latex_text  # noqa: E402
from detr_sparsity.reporting.records import (METHOD_LABELS, Comparisons, StudyRecord,  # noqa: E402
                                             flops_reduction, mgs_label, sparsity)
from detr_sparsity.sparsity.blocks import ALL_BLOCKS  # noqa: E402

log = logging.getLogger(__name__)

PNG_DPI = 200
# One colour per method in every figure (seaborn's colour-blind palette); MGS objectives take their own.
PALETTE = sns.color_palette("colorblind")
COLORS = {"dense": "black", "topk": PALETTE[0], "threshold": PALETTE[9], "random": PALETTE[7], "sibs": PALETTE[2],
          "mgs group_activity": PALETTE[5], "mgs task": PALETTE[3], "mgs distillation": PALETTE[1],
          "mgs oracle": PALETTE[4]}
MARKERS = {"topk": "o", "threshold": "X", "random": "s", "sibs": "^", "mgs group_activity": "p", "mgs task": "D",
           "mgs distillation": "v", "mgs oracle": "P"}
LINESTYLES = {"topk": ":", "threshold": "-."}  # the oracles: not methods to run
ORACLE_SERIES = ("topk", "threshold", "random")


def color(key: str):
    """A method's colour (`mgs <objective>` for MGS); an objective without one of its own takes grey."""
    return COLORS.get(key, PALETTE[7])


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "axes.titleweight": "bold", "legend.frameon": False,
                         "savefig.bbox": "tight"})


def _percent(ax, axis: str = "x") -> None:
    formatter = matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(formatter)


def _plain_number(value: float) -> str:
    """0.05, 6.83, 120: up to 4 significant digits, no exponent where a reader would not write one."""
    if value != 0 and not 1e-4 <= abs(value) < 1e6:
        return f"{value:.3g}"
    return f"{float(f'{value:.4g}'):f}".rstrip("0").rstrip(".")


class PlainLogFormatter(matplotlib.ticker.LogFormatter):
    """Log-axis labels as plain numbers (6.83, 0.1, 20), not 6.83x10^0: matplotlib still decides which ticks get
    a label (the decades, and the minor ticks of a short range)."""

    def __call__(self, x, pos=None):
        return _plain_number(x) if super().__call__(x, pos) else ""


def _plain_log(axis) -> None:
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _times(axis, low: float, high: float) -> None:
    """A log2 speed-up axis labelled 1x, 2x, 4x, ... spanning at least 1x to 2x."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{_plain_number(v)}\u00d7"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    limits = (min(low, 1.0) / 1.15, max(high, 2.0) * 1.15)
    (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(*limits)


def f1_natural_sparsity(record: StudyRecord, profile: dict, regime: reported.Regime | None = None):
    """Per-image natural sparsity of each block (box: quartiles, whiskers: 5th-95th percentile); `regime`, DETR-R50's
    as reported, is shaded behind the blocks of each kind (a stand-in's study; None: the model is measured)."""
    blocks = record.blocks
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if regime is not None:
        label = f"{reported.REPORTED_MODEL}, reported (unverified)"
        for kind, (low, high) in (("encoder", regime.encoder), ("decoder", regime.decoder)):
            at = [i for i, b in enumerate(blocks, start=1) if b.startswith(f"{kind}.")]
            if at:
                ax.fill_between([at[0] - 0.45, at[-1] + 0.45], low, high, color="grey", alpha=0.25, hatch="//",
                                linewidth=0, label=label)
                label = None  # one legend entry for both kinds
    per_image = [profile["per_image_sparsity"][b] for b in blocks]
    stats = matplotlib.cbook.boxplot_stats(per_image)
    for box, values in zip(stats, per_image):
        # Whiskers at the 5th and 95th percentiles themselves, as the caption and T1 say: matplotlib would end them
        # at the outermost image inside those percentiles, visibly short of them on a few images.
        box["whislo"], box["whishi"] = numpy.percentile(values, [5, 95])
    ax.bxp(stats, widths=0.55, showfliers=False, patch_artist=True,
           boxprops={"facecolor": PALETTE[0], "alpha": 0.35}, medianprops={"color": PALETTE[0]})
    ax.set_xticks(range(1, len(blocks) + 1), blocks)
    means = [profile["per_block"][b]["natural_sparsity"] for b in blocks]
    ax.plot(range(1, len(blocks) + 1), means, "o", color="black", markersize=4,
            label=f"token-weighted mean ({profile['split']} split)")
    evaluated = [record.dense["natural_sparsity"]["per_block"][b] for b in blocks]
    ax.plot(range(1, len(blocks) + 1), evaluated, "x", color=PALETTE[3], markersize=6,
            label="token-weighted mean (evaluation split)")
    ax.set_xlabel("FFN block")
    ax.set_ylabel("natural sparsity (post-ReLU zeros, %)")
    _percent(ax, "y")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
    return fig


def f2_topk_vs_random(record: StudyRecord):
    """AP against induced sparsity for top-k, the threshold oracle and random keep, one panel per scope (all blocks,
    each block)."""
    scopes = [ALL_BLOCKS, *record.blocks]
    columns = 4
    rows = -(-len(scopes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.6 * rows), sharex=True, sharey=True,
                             squeeze=False)
    dense_ap = record.dense["AP"]
    for ax, scope in zip(axes.flat, scopes):
        for method in ORACLE_SERIES:
            sweep = record.masking(method, scope)
            if not sweep:  # a method the study did not run
                continue
            # The x axis is the sparsity of the masked block(s): 1 - keep-ratio for top-k and random, as
            # calibrated for threshold (the study-wide share is smaller when one block alone is masked).
            ax.plot([sparsity(r, scope) for r in sweep], [r["AP"] for r in sweep], marker=MARKERS[method],
                    markersize=4, color=COLORS[method], label=METHOD_LABELS[method],
                    linestyle="-." if method == "threshold" else "-")
        ax.axhline(dense_ap, color=COLORS["dense"], linestyle="--", linewidth=1, label="dense")
        ax.set_title("all blocks" if scope == ALL_BLOCKS else scope)
        _percent(ax)
    for ax in axes.flat[len(scopes):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("AP")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", bbox_to_anchor=(0.98, 0.12))
    fig.supxlabel("induced sparsity of the masked block(s)")
    fig.tight_layout()
    return fig


def f3_flops_vs_ap(record: StudyRecord):
    """AP against the FFN FLOPs saved (gate cost included), for dense, SIBS, every MGS gate set (every gated block at
    once) and the top-k and threshold oracles."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    dense = record.dense
    ax.plot([flops_reduction(dense)], [dense["AP"]], "*", color=COLORS["dense"], markersize=12, label="dense")
    series = [("sibs", METHOD_LABELS["sibs"], record.sibs())]
    series += [(f"mgs {o}", mgs_label(o), record.mgs(o)) for o in record.mgs_objectives()]
    # keep-ratio 1 (the dense check) left out
    series += [(m, METHOD_LABELS[m], [r for r in record.masking(m) if r["setting"]["keep_ratio"] < 1])
               for m in ("topk", "threshold")]
    for key, label, rows in series:
        if not rows and key == "threshold":  # a method the study did not run
            continue
        ax.plot([flops_reduction(r) for r in rows], [r["AP"] for r in rows], marker=MARKERS.get(key, "o"),
                markersize=5, color=color(key), label=label, linestyle=LINESTYLES.get(key, "-"))
    # Targets labelled beside the points: the first objective's to the lower left, the others' upper right.
    for i, objective in enumerate(record.mgs_objectives()):
        for r in record.mgs(objective):
            ax.annotate(f"{r['setting']['target']:g}", (flops_reduction(r), r["AP"]), textcoords="offset points",
                        xytext=(-16, -9) if i == 0 else (5, 3), fontsize=7, color=color(f"mgs {objective}"))
    ax.set_xlabel("FFN FLOPs reduction (1 - FLOPs as run / dense, gate cost included)")
    ax.set_ylabel("AP")
    _percent(ax)
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower left")
    return fig


def trained_end_to_end(record: StudyRecord, trainings: dict[tuple[str, float], dict]) -> list[str]:
    """The objectives with a training curve: group_activity's gates are trained layer-locally, without one."""
    return [o for o in record.mgs_objectives() if any(t.get("curve") for (objective, _), t in trainings.items()
                                                      if objective == o)]


def f4_gate_training(record: StudyRecord, trainings: dict[tuple[str, float], dict]):
    """Per objective trained end to end: the hard induced sparsity against the budget (top) and the objective loss
    (bottom). Objectives without a curve are left out; a study without any gets one panel saying so."""
    objectives = trained_end_to_end(record, trainings)
    if not objectives:
        fig, ax = plt.subplots(figsize=(5.0, 2.0))
        ax.set_axis_off()
        without = ", ".join(record.mgs_objectives()) or "none"
        ax.text(0.5, 0.5, f"No gate set of this study was trained end to end\n(objectives: {without}; their gates "
                "are only calibrated per target)", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                color="dimgrey")
        return fig
    targets = sorted({t for _, t in trainings})
    colors = dict(zip(targets, sns.color_palette("viridis", len(targets))))
    fig, axes = plt.subplots(2, len(objectives), figsize=(4.2 * len(objectives), 5.6), sharex=True, squeeze=False)
    for column, objective in enumerate(objectives):
        top, bottom = axes[0, column], axes[1, column]
        panel_losses: list[float] = []
        for target in targets:
            training = trainings.get((objective, target))
            if training is None or not training.get("curve"):
                continue
            curve = training["curve"]
            steps = [p["step"] for p in curve]
            top.plot(steps, [p["induced_sparsity"] for p in curve], color=colors[target], linewidth=1,
                     label=f"{target:g}")
            top.plot(steps, [1.0 - p["budget"] for p in curve], color=colors[target], linewidth=0.8,
                     linestyle="--")
            losses = [p["objective_loss"] for p in curve]
            bottom.plot(steps, losses, color=colors[target], linewidth=0.8)
            panel_losses += losses
        top.set_title(mgs_label(objective))
        top.set_ylabel("induced sparsity of the batch")
        _percent(top, "y")
        bottom.set_ylabel(f"{objective} loss")
        bottom.set_xlabel("training step")
        if panel_losses and min(panel_losses) > 0:
            bottom.set_yscale("log")
            _plain_log(bottom.yaxis)
        else:  # a log scale would drop these curves without a word: linear, and the panel says why
            why = ("no training curve" if not panel_losses else "loss 0 at every step" if not any(panel_losses)
                   else "loss \u2264 0 at some steps")
            bottom.text(0.5, 0.8, f"{why}:\nnot drawn on a log scale", transform=bottom.transAxes, ha="center",
                        va="center", fontsize=9, color="dimgrey",
                        bbox={"facecolor": "white", "edgecolor": "lightgrey", "boxstyle": "round"})
    axes[0, -1].legend(title="target\n(dashed: budget)", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                       title_fontsize=8)
    fig.tight_layout()
    return fig


def f5_mgs_per_block(record: StudyRecord, comparisons: Comparisons | None = None):
    """Left: the induced sparsity of each block on the evaluation split with every gated block at once, per target,
    one panel per objective. Right: the AP retained with each block's gate alone (single-block protocol), per
    target, with its bootstrap interval where comparisons.json has one."""
    comparisons = comparisons or Comparisons.of(None)
    objectives = record.mgs_objectives()
    blocks = record.blocks
    single_blocks = record.single_blocks()
    panels = len(objectives) + bool(single_blocks)
    if not panels:
        fig, ax = plt.subplots(figsize=(5.0, 2.0))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "No MGS gate set in this study", transform=ax.transAxes, ha="center", va="center",
                color="dimgrey")
        return fig
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)

    def bars(ax, names, per_target, show_interval=False):
        """One bar per name and target: per_target is [(target, {name: value}, {name: (low, high)})]."""
        colors = sns.color_palette("viridis", len(per_target))
        width = 0.8 / max(len(per_target), 1)
        for i, ((target, values, intervals), bar_color) in enumerate(zip(per_target, colors)):
            xs = [b + (i - (len(per_target) - 1) / 2) * width for b, name in enumerate(names) if name in values]
            present = [name for name in names if name in values]
            heights = [values[name] for name in present]
            ax.bar(xs, heights, width=width, color=bar_color, label=f"{target:g}")
            spanned = [(x, h, intervals[n]) for x, h, n in zip(xs, heights, present) if n in intervals]
            if show_interval and spanned:  # the bars with an interval in comparisons.json
                ax.errorbar([x for x, _, _ in spanned], [h for _, h, _ in spanned],
                            yerr=[[h - low for _, h, (low, _) in spanned], [high - h for _, h, (_, high) in spanned]],
                            fmt="none", elinewidth=0.8, capsize=2, ecolor="dimgrey")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_xlabel("FFN block")
        _percent(ax, "y")
        ax.legend(title="target", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8)

    for ax, objective in zip(axes.flat, objectives):
        per_target = [(row["setting"]["target"], {b: sparsity(row, b) for b in blocks}, {})
                      for row in record.mgs(objective)]
        bars(ax, blocks, per_target)
        ax.set_title(f"{mgs_label(objective)}, every block at once", fontsize=9)
        ax.set_ylabel("induced sparsity (evaluation split)")
        ax.set_ylim(0, 1)
    if single_blocks:
        ax = axes.flat[-1]
        per_target = []
        for target in record.single_targets():
            values, intervals = {}, {}
            for block in single_blocks:
                for row in record.mgs_single(block):
                    if row["setting"]["target"] != target:
                        continue
                    entry = comparisons.retention(row)
                    values[block] = entry["AP_ratio"] if entry else record.retention(row)
                    if entry and all(_finite(entry[k]) for k in ("AP_ratio", "AP_ratio_low", "AP_ratio_high")):
                        intervals[block] = (entry["AP_ratio_low"], entry["AP_ratio_high"])
            per_target.append((target, values, intervals))
        bars(ax, single_blocks, per_target, show_interval=True)
        ax.axhline(1.0, color=COLORS["dense"], linestyle="--", linewidth=1)
        ax.axhline(0.97, color="dimgrey", linestyle=":", linewidth=1)
        objective = record.mgs_single(single_blocks[0])[0]["setting"]["objective"]
        ax.set_title(f"{mgs_label(objective)}, each block alone", fontsize=9)
        ax.set_ylabel("AP retained (% of dense)")
    fig.tight_layout()
    return fig


def _finite(value) -> bool:
    return value is not None and value == value and abs(value) != float("inf")


def f6_speed(speed: dict):
    """Measured speed-up against the FLOPs speed-up, per FFN block kind and end to end, at both sizes."""
    rows = speed["rows"]
    present = {r["shape"] for r in rows}
    shapes = [s for s in ("study", "detr-r50") if s in present] + sorted(present - {"study", "detr-r50"})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.0 * len(shapes), 3.8), squeeze=False)
    scope_markers = {"encoder": "o", "decoder": "s", "model": "*"}
    threads = speed.get("threads")
    measured_with = (f"{threads} thread{'' if threads == 1 else 's'}" if isinstance(threads, int)
                     else "threads not recorded")
    for ax, shape in zip(axes.flat, shapes):
        measured = [r for r in rows if r["shape"] == shape]
        for r in measured:
            key = "sibs" if r["method"] == "sibs" else f"mgs {r.get('objective') or 'task'}"
            ax.plot(r["flops_speedup"], r["speedup"], scope_markers.get(r["scope"], "o"), color=color(key),
                    markersize=7 if r["scope"] == "model" else 5, alpha=0.85)
        values = [v for r in measured for v in (r["flops_speedup"], r["speedup"])] or [1.0]
        low, top = min(values), max(values)
        ceiling = speed.get("amdahl_ceiling", {}).get(shape)
        ax.plot([1, top], [1, top], color="grey", linewidth=0.8, linestyle="--", label="measured = FLOPs")
        ax.axhline(1.0, color="black", linewidth=0.8, label="no gain (below: slower than dense)")
        if ceiling:
            ax.axhline(ceiling, color=PALETTE[3], linewidth=0.8, linestyle=":", label="Amdahl ceiling (end to end)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        _times(ax.xaxis, low, top)
        _times(ax.yaxis, low, max(top, ceiling or 1.0))
        ax.set_title(f"{shape} shapes")
        ax.set_xlabel("FLOPs speed-up (dense / sparse FLOPs)")
        ax.set_ylabel(f"measured speed-up ({measured_with})")
    handles = [matplotlib.lines.Line2D([], [], marker=m, linestyle="", color="grey",
                                       label="end to end" if s == "model" else f"{s} FFN blocks")
               for s, m in scope_markers.items()]
    methods = {"sibs" if r["method"] == "sibs" else f"mgs {r.get('objective') or 'task'}" for r in rows}
    handles += [matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=color(k),
                                        label="SIBS" if k == "sibs" else mgs_label(k.split()[1]))
                for k in sorted(methods)]
    lines = {}  # the reference lines of every panel, each once (a panel may lack the Amdahl ceiling)
    for ax in axes.flat:
        lines.update({label: line for line, label in zip(*ax.get_legend_handles_labels())})
    handles += list(lines.values())
    # Below the panels, never over a point.
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=min(4, len(handles)),
               fontsize=8)
    return fig


def captions(study: str, profile_split: str, evaluate_split: str,
             stand_in: reported.StandIn | None = None) -> dict[str, str]:
    """One caption per figure, naming the study and the data each figure is drawn from. Built from settings
    alone, so that the Snakemake report (workflow/report/figure.rst) shows the very same text. `stand_in`: the
    model the pipeline pretrained in place of DETR-R50 (F1 then shows DETR-R50's reported regime beside it), None
    for a model measured as loaded."""
    study = f"{study} study"
    regime = reported.DETR_R50_REGIME
    return {
        "f1_natural_sparsity": (
            f"Natural sparsity of each FFN block ({study}): the share of post-ReLU zeros per image on the "
            f"{profile_split} split (boxes: quartiles; whiskers: 5th to 95th percentile), with the token-weighted "
            f"mean there (dots) and on the {evaluate_split} split (crosses)."
            + (f" Shaded: the paper's model, {reported.REPORTED_MODEL}, as reported for its shallow encoder and "
               f"deep decoder blocks ({regime.describe()}; {reported.SOURCE}), not measured here. The study's "
               f"model stands in for it, {stand_in.origin()}."
               if stand_in else "")),
        "f2_topk_vs_random": (
            f"Top-k against random keep ({study}, paper Fig. 2), with the threshold oracle: COCO AP on the "
            f"{evaluate_split} split against the induced sparsity of the masked block(s), masking all blocks at once "
            f"or one block alone. Top-k keeps the k largest activations of each token, random k at random; "
            f"threshold (dash-dotted) keeps the activations above a per-block threshold calibrated on the "
            f"{profile_split} split to the target sparsity, so the number kept varies per token. Top-k and "
            f"threshold are oracles: they compute every activation to choose. Dashed: dense AP."),
        "f3_flops_vs_ap": (
            f"AP against FFN FLOPs reduction ({study}, paper Fig. 3): dense, the SIBS threshold sweep, every "
            f"MGS gate set with every gated block at once (labels: sparsity target), and the top-k (dotted) and "
            f"threshold (dash-dotted) oracles, on the {evaluate_split} split. FLOPs = 2 x multiply-accumulates per "
            f"image, counted on the run; MGS includes its gates' cost; the oracles save only fc2's work."),
        "f4_gate_training": (
            f"MGS gate training end to end through the frozen DETR ({study}): the induced sparsity of each training "
            f"batch under the hard gate mask against the budget it is held to (dashed; it falls to 1 - target during "
            f"the warm-up), and the objective's loss, per step, for each objective's one training (legend: the target "
            f"it trains toward); not drawn: group_activity's gates (the paper's objective), trained layer-locally "
            f"(their cost in T3). After training, every objective's gates are calibrated on the {profile_split} "
            f"split to each target (T3)."),
        "f5_mgs_per_block": (
            f"MGS per FFN block ({study}, {evaluate_split} split). Left, every gated block at once: each block's "
            f"induced sparsity per target; the gates meet the model-wide target by closing some blocks more than "
            f"others. Right, each block's group_activity gate alone, the other blocks dense (the paper's headline "
            f"protocol): the AP retained (% of dense AP) per target, with paired bootstrap intervals over the "
            f"evaluation images; dashed: dense, dotted: 97 % of dense (the paper's per-layer claim)."),
        "f6_speed": (
            f"Measured speed-up of the sparse FFN execution against the speed-up its FLOPs allow ({study}; "
            f"CPU threads and repeats in speed.json): per FFN block kind and end to end (stars), at the study's "
            f"and DETR-R50's shapes. Below the solid line a setting runs slower than dense; the dotted line is "
            f"the end-to-end (Amdahl) ceiling."),
    }


def write_captions(out_dir: Path, found: dict[str, str]) -> None:
    """captions.tex (one macro per figure, e.g. \\captionFOne for F1) and captions.md."""
    numbers = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six"}
    tex = ["% Generated by the figures stage; do not edit."]
    md = ["# Figure captions", ""]
    for name, text in found.items():
        number = int(name[1:].split("_")[0])
        tex.append(rf"\newcommand{{\caption{'F' + numbers[number]}}}{{{latex_text(text)}}}")
        md += [f"**F{number}** (`{name}`): {text}", ""]
    (out_dir / "captions.tex").write_text("\n".join(tex) + "\n")
    (out_dir / "captions.md").write_text("\n".join(md))


def write_plot_series(record: StudyRecord, out_dir: Path, names: list[str] = ()) -> None:
    """CSV series for `dvc plots`: AP against induced sparsity and against FFN FLOPs reduction, one file per
    method (dvc.yaml's top-level plots overlay them; MGS: every gated block at once). Every series in `names` is
    written, with its header alone where the study has no such rows."""
    series = {m: record.masking(m) for m in ("topk", "threshold", "random")}
    series["sibs"] = record.sibs()
    series.update({f"mgs-{o}": record.mgs(o) for o in record.mgs_objectives()})
    series.update({name: [] for name in names if name not in series})
    for name, rows in series.items():
        with open(out_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["induced_sparsity", "ffn_flops_reduction", "AP", "AP50"])
            for r in rows:
                writer.writerow([f"{sparsity(r):.6f}", f"{flops_reduction(r):.6f}", f"{r['AP']:.6f}",
                                 f"{r['AP50']:.6f}"])


def write_figures(out_dir: Path, study: str, evaluate_split: str, record: StudyRecord, profile: dict,
                  trainings: list[dict], speed: dict | None, comparisons: Comparisons | None = None,
                  stand_in: reported.StandIn | None = None) -> list[str]:
    """Draw every figure into `out_dir` (PDF + PNG) with its captions; `trainings` are the gate trainings'
    records (their curves), `speed` the benchmark's result (F6; None leaves F6 out), `comparisons` the bootstrap
    intervals (F5's error bars; None draws none), `stand_in` the model pretrained in place of DETR-R50 (F1 then
    shows DETR-R50's reported regime beside it; None: the model is measured as loaded)."""
    by_setting = {(t["objective"], t["target"]): t for t in trainings}
    _style()
    drawings: dict[str, Callable[[], object]] = {
        "f1_natural_sparsity": lambda: f1_natural_sparsity(record, profile,
                                                           reported.DETR_R50_REGIME if stand_in else None),
        "f2_topk_vs_random": lambda: f2_topk_vs_random(record),
        "f3_flops_vs_ap": lambda: f3_flops_vs_ap(record),
        "f4_gate_training": lambda: f4_gate_training(record, by_setting),
        "f5_mgs_per_block": lambda: f5_mgs_per_block(record, comparisons),
    }
    if speed is not None:
        drawings["f6_speed"] = lambda: f6_speed(speed)
    for name, draw in drawings.items():
        fig = draw()
        fig.savefig(out_dir / f"{name}.pdf")
        fig.savefig(out_dir / f"{name}.png", dpi=PNG_DPI)
        plt.close(fig)
        log.info("drew %s", name)
    write_captions(out_dir, {name: text for name, text in captions(study, profile["split"], evaluate_split,
                                                                         stand_in).items()
                             if name in drawings})
    return list(drawings)
