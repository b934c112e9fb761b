from detr_sparsity.reporting.summary import row_files


rule summary:
    input:
        code=code("reporting", "sparsity"),  # sparsity: the block and scope order of the rows
        rows=[str(path) for path in row_files(CFG)],
    output:
        summary=f"{RESULTS}/summary.json",
        metrics=f"{RESULTS}/metrics.json",
    params:
        settings=stage_params("summary"),
    log:
        f"{RESULTS}/logs/summary.log",
    message:
        "summary: gathering the rows of every evaluation into {output.summary}"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("summary"),
    shell:
        "python -m detr_sparsity --log {log} summary --out {output.summary} --metrics {output.metrics}"
