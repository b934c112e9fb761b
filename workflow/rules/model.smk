rule model:
    input:
        code=code("models"),
        data=f"{RESULTS}/data",
    output:
        directory(f"{RESULTS}/model"),
    params:
        settings=stage_params("model"),
    log:
        f"{RESULTS}/logs/model.log",
    message:
        f"model: pretraining or fetching the dense DETR of the {STUDY} study"
    conda:
        "../envs/study.yaml"
    threads: MAX_THREADS
    resources:
        cpu_slots=cpu_slots,
        **job_resources("model"),
    shell:
        "python -m detr_sparsity --log {log} model --data {input.data} --out {output}"
