# One job per (method, keep-ratio) point of params.yaml's sweep (the summary asks for them); each job
# evaluates every FFN block masked alone and all blocks at once.
rule masking:
    input:
        code=code("sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
    output:
        detections=directory(f"{RESULTS}/masking/{{method}}-{{keep}}/detections"),
        rows=f"{RESULTS}/masking/{{method}}-{{keep}}/rows.json",
    params:
        settings=stage_params("masking"),
    log:
        f"{RESULTS}/logs/masking-{{method}}-{{keep}}.log",
    message:
        f"masking: {{wildcards.method}} keep-ratio {{wildcards.keep}}, every FFN block alone and all at once"
    wildcard_constraints:
        method="topk|random",
        keep=r"[0-9.]+",
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("masking"),
    shell:
        "python -m detr_sparsity --log {log} masking --method {wildcards.method} --keep-ratio {wildcards.keep}"
        " --model {input.model} --data {input.data} --detections {output.detections} --rows {output.rows}"
