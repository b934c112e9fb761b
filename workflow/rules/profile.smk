rule profile:
    input:
        code=code("sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
    output:
        directory(f"{RESULTS}/profile"),
    params:
        settings=stage_params("profile"),
    log:
        f"{RESULTS}/logs/profile.log",
    message:
        f"profile: FFN activation statistics of the dense model on the {CFG.profile['split']} split"
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("profile"),
    shell:
        "python -m detr_sparsity --log {log} profile --model {input.model} --data {input.data} --out {output}"
