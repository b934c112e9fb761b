# Every evaluated configuration; later stages add theirs here and in dvc.yaml's summary deps.
EVALUATIONS = ["dense"]


rule summary:
    input:
        code=code("reporting"),
        rows=expand(f"{RESULTS}/evaluate/{{method}}/row.json", method=EVALUATIONS),
    output:
        f"{RESULTS}/summary.json",
    params:
        settings=stage_params("summary"),
    log:
        f"{RESULTS}/logs/summary.log",
    message:
        "summary: gathering {input.rows} into {output}"
    conda:
        "../envs/study.yaml"
    threads: 1
    shell:
        "python -m detr_sparsity --log {log} summary {input.rows} --out {output}"
