"""The paper's tables T0-T6, from summary.json and the stage outputs beside it (stage `tables`).

- T0 the paper's claims C1-C4, each with the measured figure, its reference and a verdict (reporting/claims.py);
- T1 the dense baseline: AP metrics, FLOPs, and the natural sparsity of each FFN block (beside DETR-R50's as
  reported, on a stand-in);
- T2 the SIBS threshold sweep: sparsity, AP and FLOPs per threshold;
- T3 MGS in both protocols: every gated block at once per objective and target (achieved sparsity per block, AP
  metrics, FFN and whole-model FLOPs, what the gates cost to train and calibrate), and each block gated alone
  (its sparsity and AP retained, with the paper's per-layer claim judged block by block);
- T4 the methods side by side at matched sparsity: accuracy (AP retained, MGS against the top-k and threshold
  oracles, with paired bootstrap intervals from comparisons.json), then FLOPs and the latency measured by the
  benchmark stage;
- T5 measured speed: sparse execution against dense per FFN block kind and end to end, at the study's and
  DETR-R50's shapes, next to the FLOPs speed-up and the Amdahl ceiling (benchmark/speed.json);
- T6 what the study cost to compute: per stage its jobs, wall and CPU minutes, threads per job and share, on which
  machine and when (benchmark/cost.json).

Each table is written as Markdown (results/<study>/tables/) and as LaTeX with booktabs (paper/<study>/tables/), from
the same cells, and states its units and the FLOPs convention. Numbers are rounded for reading only: AP to
three decimals, percentages to one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from detr_sparsity.evaluation.coco_eval import AP_METRICS
from detr_sparsity.reporting import reported
from detr_sparsity.reporting.claims import (CLAIM_RETENTION, CLAIM_SPARSITY, CLAIM_SPARSITY_TOLERANCE, Verdict,
                                            judge, single_block_counts, single_block_holds)
from detr_sparsity.reporting.latex import latex_text
from detr_sparsity.reporting.records import (METHOD_LABELS, Comparisons, StudyRecord, flops_ratio, mgs_label,
                                             sparsity)

log = logging.getLogger(__name__)

FLOPS_NOTE = ("FLOPs = 2 x multiply-accumulates per image, counted on the run (torch.utils.flop_counter); "
              "x dense = FLOPs as run / dense FLOPs, gate cost included. Sparsity: share of FFN hidden neurons, "
              "token-weighted over real tokens.")
AP_NOTE = "AP metrics: pycocotools COCOeval (bbox); n/a: the split holds no object in that area range. "
# How far a SIBS threshold's sparsity may lie from a target to be shown as matched in T4.
SIBS_MATCH_TOLERANCE = 0.05


def ap(value: float) -> str:
    # COCOeval reports -1 where the split has no ground truth in that area range.
    return "n/a" if value < 0 else f"{value:.3f}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def times(value: float) -> str:
    return f"{value:.2f}x"


def seconds(value: float | None) -> str:
    """Seconds of work; 'none' where a gate set had no such step (0), '' where the row does not say."""
    if value is None:
        return ""
    return "none" if value == 0 else f"{value:.1f}"


def _defined(*values) -> bool:
    return all(v is not None and not math.isnan(v) for v in values)


def with_interval(point: float, low: float | None, high: float | None, show) -> str:
    """'81.2 [77.0, 85.1]': a point estimate and its interval, each written by `show`; the point alone where the
    interval is undefined, 'n/a' where the point is."""
    if not _defined(point):
        return "n/a"
    return f"{show(point)} [{show(low)}, {show(high)}]" if _defined(low, high) else show(point)


def points(value: float) -> str:
    """An AP difference in AP points (100 x AP), signed: '+1.2', '-0.4'."""
    return f"{100 * value:+.1f}"


def retained(record: StudyRecord, comparisons: Comparisons, row: dict) -> str:
    """AP retained (% of dense), with its paired bootstrap interval where comparisons.json has one."""
    entry = comparisons.retention(row)
    if entry is None:
        return pct(record.retention(row))
    return with_interval(entry["AP_ratio"], entry["AP_ratio_low"], entry["AP_ratio_high"], pct)


def against_oracle(comparisons: Comparisons, row: dict, oracle: str) -> str:
    """The MGS row's AP minus the oracle's at the same target and scope, in AP points with its interval; '' where
    not compared."""
    entry = comparisons.against_oracle(row, oracle)
    if entry is None:
        return ""
    return with_interval(entry["AP_difference"], entry["AP_difference_low"], entry["AP_difference_high"], points)


def retained_header(comparisons: Comparisons) -> str:
    return (f"AP retained (%) [{100 * comparisons.level:g} % CI]" if comparisons.entries else "AP retained (%)")


def interval_note(comparisons: Comparisons) -> str:
    if not comparisons.entries:
        return "No bootstrap intervals (comparisons.json holds none). "
    return (f"[low, high]: paired {100 * comparisons.level:g} % bootstrap interval over the {comparisons.images} "
            f"evaluation images ({comparisons.resamples} resamples, the same image sets for both sides; "
            "comparisons.json). ")


@dataclass
class Table:
    """One tabular: a header row, body rows (a row of one cell is a section heading), a note."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: str = ""  # LaTeX column types; default: the first left, the rest right (numbers)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        for row in self.rows:
            cells = [f"**{row[0]}**", *[""] * (len(self.header) - 1)] if len(row) == 1 else row
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def latex(self) -> str:
        align = self.align or "l" + "r" * (len(self.header) - 1)
        lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(map(latex_text, self.header)) + r" \\",
                 r"\midrule"]
        for i, row in enumerate(self.rows):
            if len(row) == 1:
                if i:
                    lines.append(r"\midrule")
                lines.append(rf"\multicolumn{{{len(self.header)}}}{{l}}{{\emph{{{latex_text(row[0])}}}}} \\")
            else:
                lines.append(" & ".join(map(latex_text, row)) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)


@dataclass
class PaperTable:
    """A numbered table: a title (its caption), one or more tabulars, and the note on units."""

    name: str
    title: str
    parts: list[Table]
    note: str

    def markdown(self) -> str:
        body = "\n\n".join(part.markdown() for part in self.parts)
        return f"# {self.title}\n\n{body}\n\n{self.note}\n"

    def latex(self) -> str:
        parts = "\n\\\\[2ex]\n".join(part.latex() for part in self.parts)  # one row of the outer tabular each
        return ("% Generated by the tables stage; do not edit.\n"
                "\\begin{table}[tbp]\n\\centering\n\\footnotesize\n\\setlength{\\tabcolsep}{4pt}\n"
                f"\\caption{{{latex_text(self.title)}}}\n\\label{{tab:{self.name.split('_')[0]}}}\n"
                f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n"
                f"\\begin{{tabular}}{{c}}\n{parts}\n\\end{{tabular}}}}\n"
                f"\\par\\smallskip\\parbox{{\\linewidth}}{{\\scriptsize {latex_text(self.note)}}}\n"
                "\\end{table}\n")


def _reported_range(name: str, regime: reported.Regime) -> str:
    low, high = regime.encoder if name.startswith("encoder.") else regime.decoder
    return f"{pct(low)}-{pct(high)}"


def t1_dense(record: StudyRecord, profile: dict, stand_in: reported.StandIn | None = None) -> PaperTable:
    """`stand_in`: the model the pipeline pretrained in place of DETR-R50, whose blocks T1 shows beside DETR-R50's
    reported regime (None: the model is measured as loaded)."""
    regime = reported.DETR_R50_REGIME if stand_in else None
    dense = record.dense
    metrics = Table(header=[*AP_METRICS, "FFN GFLOPs", "model GFLOPs"],
                    rows=[[*(ap(dense[m]) for m in AP_METRICS), f"{dense['ffn_flops']['dense'] / 1e9:.3f}",
                           f"{dense['total_flops']['dense'] / 1e9:.3f}"]])
    per_image = profile["per_image_sparsity"]
    reference = [f"{reported.REPORTED_MODEL}, reported (%)"] if regime else []
    blocks = Table(header=["FFN block", "natural sparsity (%)",
                           f"{profile['split']} split: mean (%)", "per image: 5th-95th pct. (%)",
                           "never-firing neurons", *reference])
    for name in [*record.blocks, "overall"]:
        if name == "overall":
            blocks.rows.append(["all blocks", pct(dense["natural_sparsity"]["overall"]),
                                pct(profile["natural_sparsity"]["overall"]), "", "",
                                *([f"up to {pct(regime.largest)}"] if regime else [])])
            continue
        # The same percentiles as F1's whiskers (numpy's linear interpolation).
        low, high = numpy.percentile(per_image[name], [5, 95])
        blocks.rows.append([name, pct(dense["natural_sparsity"]["per_block"][name]),
                            pct(profile["per_block"][name]["natural_sparsity"]), f"{pct(low)}-{pct(high)}",
                            str(profile["per_block"][name]["never_firing_neurons"]),
                            *([_reported_range(name, regime)] if regime else [])])
    # A part of its source (COCO: val2017 less held-out images) is not what published results are measured on.
    split_note = dense.get("split_note")
    reference_note = (f"{reported.REPORTED_MODEL}, reported: the natural sparsity of the paper's model as "
                      f"{reported.SOURCE} gives it, for its shallow encoder and deep decoder blocks, shown beside this "
                      f"stand-in's blocks of the same kind; not measured here. The stand-in is {stand_in.origin()}. "
                      if stand_in else "")
    return PaperTable(
        "t1_dense", f"T1. Dense baseline: COCO AP on {dense['images']} evaluation images"
                    f"{' (not the whole of val2017: see the note)' if split_note else ''} and natural sparsity of "
                    "each FFN block",
        [metrics, blocks],
        (f"Evaluation images: {split_note}. " if split_note else "")
        + AP_NOTE + "Natural sparsity: share of post-ReLU zeros in the FFN hidden layer, on the "
        f"evaluation split and on the {profile['images']} images of the {profile['split']} split (mean and "
        "per-image spread). Never-firing neurons: zero on every token of that split. " + reference_note
        + FLOPS_NOTE)


def t0_claims(verdicts: list[Verdict]) -> PaperTable:
    table = Table(header=["claim", "the paper", "judged against", "measured on this study", "verdict"],
                  rows=[[v.claim, v.statement, v.reference, v.measured, v.verdict] for v in verdicts],
                  align=r"p{0.09\linewidth}p{0.25\linewidth}p{0.22\linewidth}p{0.3\linewidth}p{0.07\linewidth}")
    return PaperTable(
        "t0_claims", "T0. The paper's claims C1-C4 judged on this study", [table],
        "Verdicts by fixed rules from summary.json, comparisons.json and the profile (reporting/claims.py): holds, "
        "does not hold, or not measurable here (the study lacks the rows the rule reads). Point estimates; T3 and "
        "T4 give the bootstrap intervals. Kept the dense AP: at least "
        f"{100 * CLAIM_RETENTION:.0f} % of it. What is said of the paper comes from {reported.SOURCE}. "
        "Sparsity: natural (C1) or induced (C2-C4), token-weighted over real tokens.")


def t2_sibs(record: StudyRecord) -> PaperTable:
    table = Table(header=["threshold tau", "induced sparsity (%)", "encoder (%)", "decoder (%)", "AP", "AP50",
                          "AP retained (%)", "FFN FLOPs (x dense)", "model FLOPs (x dense)"])
    rows = record.sibs()
    indicator = rows[0]["setting"]["indicator"] if rows else "firing_frequency"
    for row in rows:
        measure = row["induced_sparsity"]
        table.rows.append([f"{row['setting']['threshold']:g}", pct(measure["overall"]), pct(measure["encoder"]),
                           pct(measure["decoder"]), ap(row["AP"]), ap(row["AP50"]), pct(record.retention(row)),
                           times(flops_ratio(row)), times(flops_ratio(row, "total_flops"))])
    return PaperTable(
        "t2_sibs", f"T2. SIBS threshold sweep: neurons whose {indicator.replace('_', ' ')} is below tau are skipped "
                   "for every input", [table],
        f"Dense AP {ap(record.dense['AP'])}; AP retained = AP / dense AP. " + FLOPS_NOTE)


def t3_mgs(record: StudyRecord, comparisons: Comparisons) -> PaperTable:
    blocks = record.blocks
    table = Table(header=["target", "achieved (%)", *[f"{b} (%)" for b in blocks], *AP_METRICS,
                          "FFN FLOPs (x dense)", "model FLOPs (x dense)"])
    # The trainings are once per objective, shared by its targets; each target has its own calibration.
    cost = Table(header=["target", "trained toward", "training steps", "end-to-end training (s, once)",
                         "layer-local training (s, once)", "calibration (s)", "calibrated on"])
    group_size = None
    for objective in record.mgs_objectives():
        table.rows.append([f"{mgs_label(objective)}: every gated block at once"])
        cost.rows.append([f"{mgs_label(objective)}: cost"])
        for row in record.mgs(objective):
            group_size = row["setting"]["group_size"]
            table.rows.append([f"{row['setting']['target']:g}", pct(sparsity(row)),
                               *(pct(sparsity(row, b)) for b in blocks), *(ap(row[m]) for m in AP_METRICS),
                               times(flops_ratio(row)), times(flops_ratio(row, "total_flops"))])
            training = row.get("training") or {}
            calibration = training.get("calibration") or {}
            steps = training.get("steps")
            toward = training.get("trained_toward")
            cost.rows.append([f"{row['setting']['target']:g}", "" if toward is None else f"{toward:g}",
                              "" if steps is None else str(steps),
                              seconds(training.get("train_seconds")), seconds(training.get("local_train_seconds")),
                              seconds(training.get("calibration_seconds", calibration.get("seconds"))),
                              calibration.get("split", "")])
    parts = [table, cost]
    counts = single_block_counts(record, comparisons)
    single = Table(header=["FFN block", "its induced sparsity (%)", "AP", retained_header(comparisons),
                           "AP - threshold (points)", "AP - top-k (points)", "claim holds"])
    for target, (holds, gated) in counts.items():
        single.rows.append([f"single block, target {target:g}: the paper's per-layer claim holds in {holds} of "
                            f"{gated} blocks"])
        for block in record.single_blocks():
            for row in record.mgs_single(block):
                if row["setting"]["target"] != target:
                    continue
                group_size = group_size or row["setting"]["group_size"]
                single.rows.append([block, pct(sparsity(row, block)), ap(row["AP"]),
                                    retained(record, comparisons, row), against_oracle(comparisons, row, "threshold"),
                                    against_oracle(comparisons, row, "topk"),
                                    "yes" if single_block_holds(record, comparisons, row) else "no"])
    paper_rows = record.mgs_paper_setting()
    if paper_rows:
        paper = Table(header=["setting", "achieved (%)", *[f"{b} (%)" for b in blocks], "AP", retained_header(comparisons),
                              "FFN FLOPs (x dense)"])
        paper.rows.append(["the paper's own setting: every block, no calibration"])
        for row in paper_rows:
            paper.rows.append([f"G = {row['setting']['group_size']}, threshold {row['setting']['gate_threshold']:g}",
                               pct(sparsity(row)), *(pct(sparsity(row, b)) for b in blocks), ap(row["AP"]),
                               retained(record, comparisons, row), times(flops_ratio(row))])
        parts.append(paper)
    if counts:
        parts.append(single)
        either = sum(any(single_block_holds(record, comparisons, r) for r in record.mgs_single(b))
                     for b in record.single_blocks())
        verdict = "; ".join(f"{holds} of {gated} blocks at target {target:g}" for target, (holds, gated)
                            in counts.items())
        single_note = (
            "Single block (the paper's headline protocol): each block's group_activity gate alone, the other blocks "
            "dense, calibrated to the target; its induced sparsity on the evaluation split, and the whole model's AP. "
            f"The paper's per-layer claim (at least {100 * CLAIM_RETENTION:.0f} % of the dense AP at at least "
            f"{100 * CLAIM_SPARSITY:.0f} % sparsity) is judged to hold in a block where the AP retained (point "
            f"estimate) is at least {100 * CLAIM_RETENTION:.0f} % and the block's sparsity at least "
            f"{100 * (CLAIM_SPARSITY - CLAIM_SPARSITY_TOLERANCE):.0f} % ({100 * CLAIM_SPARSITY:.0f} % less "
            f"{100 * CLAIM_SPARSITY_TOLERANCE:.0f} points of calibration tolerance): it holds in {verdict}; at one "
            f"target or more in {either} of {len(record.single_blocks())} blocks. AP - oracle: the block's gate "
            "against the top-k or threshold oracle masking that block alone at the same target, in AP points "
            "(100 x AP). " + interval_note(comparisons))
    else:
        single_note = "No block was gated alone in this study (mgs.single_block_targets). "
    return PaperTable(
        "t3_mgs", f"T3. MGS per objective and induced-sparsity target, every gated block at once and each block alone "
                  f"(groups of G = {group_size} neurons)",
        parts,
        f"Achieved: induced sparsity over every gated block on the evaluation split; per block beside it. Dense AP "
        f"{ap(record.dense['AP'])}. Every objective's gates are trained once per study and calibrated to each "
        f"target. Cost: end-to-end training through the frozen DETR toward the target in 'trained toward', one "
        f"training shared by every target of the objective (none for group_activity); layer-local training: "
        f"group_activity's training from each block's dense input (the start of a warm-started end-to-end "
        f"training), shared by every target and by the single-block rows; calibration: fitting the gates' "
        f"thresholds to the target on held-out images; seconds of wall-clock on the machine that ran the job. "
        + ("The paper's own setting: group_activity gates with the paper's group size, trained once, evaluated at "
           "the sigmoid threshold as is, with no calibration: its sparsity is whatever the gates give. "
           if paper_rows else "")
        + single_note + AP_NOTE + FLOPS_NOTE)


def _speed_rows(speed: dict | None) -> dict[tuple[str, float, str | None], dict]:
    """End-to-end rows of the study's shapes, keyed by (method, setting, objective)."""
    if speed is None:
        return {}
    return {(r["method"], float(r["setting"]), r.get("objective")): r for r in speed["rows"]
            if r["shape"] == "study" and r["scope"] == "model"}


def _latency(measured: dict | None) -> str:
    if measured is None:
        return "not measured"
    text = f"{measured['dense_ms']:.1f} -> {measured['sparse_ms']:.1f} ms ({measured['speedup']:.2f}x)"
    return text + (", no gain" if measured["speedup"] <= 1.0 else "")


def t4_matched(record: StudyRecord, speed: dict | None, comparisons: Comparisons | None = None) -> PaperTable:
    comparisons = comparisons or Comparisons.of(None)
    latencies = _speed_rows(speed)
    accuracy = Table(header=["method", "setting", "induced sparsity (%)", "AP", retained_header(comparisons),
                             "AP - threshold (points)", "AP - top-k (points)"])
    cost = Table(header=["method", "setting", "induced sparsity (%)", "FFN FLOPs (x dense)", "model FLOPs (x dense)",
                         "latency dense -> sparse"])
    sibs = record.sibs()
    targets = sorted({row["setting"]["target"] for o in record.mgs_objectives() for row in record.mgs(o)})
    for target in targets:
        accuracy.rows.append([f"target sparsity {target:g}: accuracy"])
        cost.rows.append([f"target sparsity {target:g}: cost"])
        candidates = []
        for method in ("topk", "threshold", "random"):
            found = [r for r in record.masking(method) if abs(r["setting"]["keep_ratio"] - (1 - target)) < 1e-9]
            # None is a method to deploy: top-k and threshold are the accuracy oracles, random the floor.
            candidates += [(METHOD_LABELS[method], f"keep {r['setting']['keep_ratio']:g}", r, "reference, not run")
                           for r in found]
        if sibs:
            nearest = min(sibs, key=lambda r: abs(sparsity(r) - target))
            threshold = nearest["setting"]["threshold"]
            if abs(sparsity(nearest) - target) <= SIBS_MATCH_TOLERANCE:
                candidates.append((METHOD_LABELS["sibs"], f"tau {threshold:g}", nearest,
                                   _latency(latencies.get(("sibs", float(threshold), None)))))
            else:
                candidates.append((METHOD_LABELS["sibs"], f"none within {100 * SIBS_MATCH_TOLERANCE:.0f} points "
                                   f"(nearest: tau {threshold:g} at {pct(sparsity(nearest))} %)", None, ""))
        for objective in record.mgs_objectives():
            for row in record.mgs(objective):
                if row["setting"]["target"] == target:
                    candidates.append((mgs_label(objective), f"target {target:g}", row,
                                       _latency(latencies.get(("mgs", float(target), objective)))))
        for label, setting, row, latency in candidates:
            if row is None:
                accuracy.rows.append([label, setting, *[""] * 5])
                cost.rows.append([label, setting, *[""] * 4])
                continue
            accuracy.rows.append([label, setting, pct(sparsity(row)), ap(row["AP"]),
                                  retained(record, comparisons, row), against_oracle(comparisons, row, "threshold"),
                                  against_oracle(comparisons, row, "topk")])
            cost.rows.append([label, setting, pct(sparsity(row)), times(flops_ratio(row)),
                              times(flops_ratio(row, "total_flops")), latency])
    if speed is not None:
        batch = speed.get("model_inputs", {}).get("study", {})
        shape = (f"one batch of {batch['images']} images of {batch['height']}x{batch['width']} px" if batch
                 else "one evaluation batch")
        latency_note = (f"Latency: whole model on {shape} (the study's shapes), median of "
                        f"{speed.get('model_repeats', speed['repeats'])} runs "
                        f"with {speed['threads']} CPU threads, dense and sparse measured side by side (benchmark "
                        "stage, speed.json); the sparse FFN execution skips the masked work. 'no gain': the sparse "
                        "run was not faster.")
    else:
        latency_note = "Latency: not measured (no benchmark/speed.json)."
    return PaperTable(
        "t4_matched", "T4. Methods side by side at matched induced sparsity (every gated block at once)",
        [accuracy, cost],
        f"Top-k keeps the k = (1 - target) H largest activations per token; threshold keeps the activations above "
        f"a per-block threshold calibrated to the target on held-out images (the number kept varies per token). "
        f"Both compute all of fc1 to choose: they are accuracy oracles, not methods to run, and save only fc2's "
        f"work. AP retained: AP / dense AP (dense AP {ap(record.dense['AP'])}). AP - threshold, AP - top-k: an MGS "
        f"gate set's AP minus the oracle's at the same target, in AP points (100 x AP). "
        + interval_note(comparisons)
        + f"SIBS: the threshold whose sparsity lies nearest the target, if within "
        f"{100 * SIBS_MATCH_TOLERANCE:.0f} points. {latency_note} " + FLOPS_NOTE)


def _speedup(row: dict | None) -> str:
    """'2.82x of 7.63x (37 %)': measured speed-up, the FLOPs speed-up, the fraction achieved; or 'no gain'."""
    if row is None:
        return ""
    text = f"{row['speedup']:.2f}x of {row['flops_speedup']:.2f}x ({pct(row['fraction_of_theoretical'])} %)"
    return text + (", no gain" if row["speedup"] <= 1.0 else "")


def t5_speed(speed: dict) -> PaperTable:
    rows = speed["rows"]
    table = Table(header=["method", "setting", "induced sparsity (%)", "encoder FFN blocks", "decoder FFN blocks",
                          "whole model", "whole-model ceiling"])
    present = {r["shape"] for r in rows}
    for shape in [s for s in ("study", "detr-r50") if s in present] + sorted(present - {"study", "detr-r50"}):
        share = speed["ffn_share"][shape]
        table.rows.append([f"{shape} shapes: FFN share of dense model time {pct(share)} %, Amdahl ceiling "
                           f"{speed['amdahl_ceiling'][shape]:.2f}x"])
        by_point: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            if r["shape"] == shape:
                by_point.setdefault((r["method"], float(r["setting"]), r.get("objective")), {})[r["scope"]] = r
        for (method, setting, objective), scopes in sorted(by_point.items(), key=lambda kv: (kv[0][0] != "mgs",
                                                                                            kv[0][1])):
            model = scopes.get("model")
            label = mgs_label(objective) if method == "mgs" else METHOD_LABELS.get(method, method)
            table.rows.append([label, f"{'target' if method == 'mgs' else 'tau'} {setting:g}",
                               pct(model["induced_sparsity"]) if model else "", _speedup(scopes.get("encoder")),
                               _speedup(scopes.get("decoder")), _speedup(model),
                               f"{model['amdahl_ceiling_at_sparsity']:.2f}x"
                               if model and "amdahl_ceiling_at_sparsity" in model else ""])
    inputs = speed.get("model_inputs", {})
    sizes = "; ".join(f"{shape}: {v.get('images', 1)} image(s) of {v['height']}x{v['width']} px"
                      for shape, v in inputs.items())
    return PaperTable(
        "t5_speed", "T5. Measured speed of sparse execution against dense (MGS: the sparse kernel; SIBS: the "
                    "shrunk FFN)", [table],
        f"Each cell: measured speed-up (dense ms / sparse ms, median of {speed['repeats']} runs per block and "
        f"{speed.get('model_repeats', speed['repeats'])} per whole model, after {speed['warmup']} warm-up runs, "
        f"dense and sparse interleaved in one run, {speed['threads']} CPU threads) of the FLOPs speed-up, and the "
        f"fraction achieved; 'no gain': not faster than dense. Blocks of one kind are timed together. Whole "
        f"model: {sizes}; DETR-R50 weights are random, its masks drawn from the study's trained gates. The "
        f"ceiling is the end-to-end speed-up if the FFNs cost nothing beyond their sparse FLOPs (Amdahl). "
        f"Machine and library versions: speed.json.")


def minutes(value: float) -> str:
    return f"{value / 60:.1f}"


def _machine(machine: dict) -> str:
    return f"{machine['cpu']} ({machine['instruction_set']}, {machine['cores']} cores)"


def _run_dates(cost: dict) -> str:
    """'2026-12-05', or '2026-12-04 to 2026-12-05' where the runs span days (UTC)."""
    first, last = (cost[key][:10] if cost.get(key) else "" for key in ("started", "ended"))
    return first if last in ("", first) else f"{first} to {last}"


def t6_cost(cost: dict) -> PaperTable:
    table = Table(header=["stage", "jobs", "wall (min)", "CPU (min)", "threads per job", "share of wall (%)"])
    for entry in [*cost["stages"], {"stage": "all stages", **cost["total"]}]:
        table.rows.append([entry["stage"], str(entry["jobs"]), minutes(entry["wall_seconds"]),
                           minutes(entry["cpu_seconds"]), ", ".join(map(str, entry["threads"])), pct(entry["share"])])
    machines = cost["machines"]
    where = (_machine(machines[0]) if len(machines) == 1 else
             f"{len(machines)} machines: " + "; ".join(map(_machine, machines)))
    left_out = ", ".join(cost["not_reported"])
    return PaperTable(
        "t6_cost", f"T6. What the study cost to compute, per stage: runs of {_run_dates(cost)} on {where}", [table],
        "Wall and CPU minutes: sums over a stage's jobs of each job's MLflow run (the run its log names: the one "
        "that made its outputs); CPU: the job's process and the children it waited for. Jobs that ran side by side "
        "count each, so the total exceeds the elapsed time of a parallel run. Threads: the cores a job kept busy "
        "(its torch threads; the summary's processes). Share: of the summed wall minutes. Not included: "
        f"{left_out} (they run after the cost is taken, or beside it). Per job, machine and load average at its "
        "start: benchmark/cost.json.")


def study_macros(study: str, record: StudyRecord, profile: dict, model_config: dict,
                 stand_in: reported.StandIn | None = None) -> str:
    """LaTeX macros for the paper's setup section, so that its prose carries no typed numbers."""
    group_sizes = {r["setting"]["group_size"] for o in record.mgs_objectives() for r in record.mgs(o)}
    values = {
        "studyname": study,
        "valimages": record.dense["images"],
        "calibrationimages": profile["images"],
        "dmodel": model_config["d_model"],
        "ffndim": model_config["encoder_ffn_dim"],
        "encoderlayers": model_config["encoder_layers"],
        "decoderlayers": model_config["decoder_layers"],
        "numqueries": model_config["num_queries"],
        "groupsize": ", ".join(str(g) for g in sorted(group_sizes)) or "none",
        "modelorigin": stand_in.origin() if stand_in else "loaded as published, not trained here",
    }
    lines = ["% Generated by the tables stage; do not edit."]
    lines += [rf"\newcommand{{\{name}}}{{{latex_text(str(value))}}}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def write_tables(markdown_dir: Path, latex_dir: Path, study: str, record: StudyRecord, profile: dict,
                 model_config: dict, speed: dict | None, comparisons: Comparisons | None = None,
                 cost: dict | None = None, stand_in: reported.StandIn | None = None) -> list[str]:
    """Every table as Markdown into `markdown_dir` and as LaTeX into `latex_dir` (with the study's macros);
    `speed` None leaves T5 out, `comparisons` None the bootstrap intervals, `cost` None T6. `stand_in`: the model
    the pipeline pretrained in place of DETR-R50 (T1 shows the reported DETR-R50 regime beside it), None for a model
    measured as loaded."""
    comparisons = comparisons or Comparisons.of(None)
    tables = [t0_claims(judge(record, profile, comparisons, stand_in)),
              t1_dense(record, profile, stand_in), t2_sibs(record),
              t3_mgs(record, comparisons), t4_matched(record, speed, comparisons)]
    if speed is not None:
        tables.append(t5_speed(speed))
    if cost is not None:
        tables.append(t6_cost(cost))
    for table in tables:
        (markdown_dir / f"{table.name}.md").write_text(table.markdown())
        (latex_dir / f"{table.name}.tex").write_text(table.latex())
        log.info("wrote %s", table.name)
    (latex_dir / "study.tex").write_text(study_macros(study, record, profile, model_config, stand_in))
    return [t.name for t in tables]
