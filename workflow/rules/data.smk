rule data:
    input:
        code=code("data"),
    output:
        directory(f"{RESULTS}/data"),
    params:
        settings=stage_params("data"),
    log:
        f"{RESULTS}/logs/data.log",
    message:
        f"data: preparing the splits of the {STUDY} study"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("data"),
    shell:
        "python -m detr_sparsity --log {log} data --out {output}"
