# The paper: figures and tables from summary.json and the stage outputs beside it, then paper/main.pdf.
# Figures and tables are marked for `snakemake --report report.html`; their captions come from
# workflow/report/*.rst; a figure's caption is the same text the figures stage writes beside it.
from detr_sparsity.reporting.figures import captions
from detr_sparsity.reporting.paper import toolchain_missing

MGS_TRAININGS = [f"{RESULTS}/mgs/{o}/{t}/training.json" for o in CFG.mgs["objectives"] for t in CFG.mgs["targets"]]
# Without a LaTeX toolchain the PDF is left out of the pipeline (rule `all`), and said so at the start.
LATEX_MISSING = toolchain_missing()


rule figures:
    input:
        code=code("reporting"),
        summary=rules.summary.output.summary,
        profile=f"{RESULTS}/profile",
        training=MGS_TRAININGS,  # read through the rows' gate paths
        speed=rules.benchmark.output[0],
    output:
        figures=report(directory("paper/figures"), patterns=["{figure}.png"], caption="../report/figure.rst",
                       category="Figures"),
        plots=directory(f"{RESULTS}/plots"),
    params:
        settings=stage_params("figures"),
        captions=captions(STUDY, CFG.profile["split"], CFG.evaluate["split"]),
    log:
        f"{RESULTS}/logs/figures.log",
    message:
        "figures: F1-F6 from summary.json, the profile, the gate-training curves and the benchmark, as PDF and PNG"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("figures"),
    shell:
        "python -m detr_sparsity --log {log} figures --summary {input.summary} --profile {input.profile}/profile.json"
        " --speed {input.speed} --out {output.figures} --plots {output.plots}"


rule tables:
    input:
        code=code("reporting"),
        summary=rules.summary.output.summary,
        profile=f"{RESULTS}/profile",
        model=f"{RESULTS}/model",
        speed=rules.benchmark.output[0],
    output:
        markdown=report(directory(f"{RESULTS}/tables"), patterns=["{table}.md"], caption="../report/table.rst",
                        category="Tables"),
        latex=directory("paper/tables"),
    params:
        settings=stage_params("tables"),
    log:
        f"{RESULTS}/logs/tables.log",
    message:
        "tables: T1-T5 from summary.json and the benchmark, as Markdown and LaTeX"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("tables"),
    shell:
        "python -m detr_sparsity --log {log} tables --summary {input.summary} --profile {input.profile}/profile.json"
        " --model-config {input.model}/config.json --speed {input.speed} --markdown {output.markdown}"
        " --latex {output.latex}"


rule paper:
    input:
        code=code("reporting"),
        tex="paper/main.tex",
        figures=rules.figures.output.figures,
        tables=rules.tables.output.latex,
    output:
        report("paper/main.pdf", caption="../report/paper.rst", category="Paper"),
    params:
        settings=stage_params("paper"),
    log:
        f"{RESULTS}/logs/paper.log",
    message:
        "paper: paper/main.pdf with latexmk"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("paper"),
    shell:
        "python -m detr_sparsity --log {log} paper --tex {input.tex} --out {output}"
