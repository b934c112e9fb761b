# One job per (method, keep-ratio) point of params.yaml's sweep (the summary asks for them); each job
# evaluates every FFN block masked alone and all blocks at once.
MASKING_DETECTIONS = f"{RESULTS}/masking/{{method}}-{{keep}}/detections"


rule masking:
    input:
        code=code("sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        shards=shard_partials(MASKING_DETECTIONS),
    output:
        detections=directory(MASKING_DETECTIONS),
        rows=f"{RESULTS}/masking/{{method}}-{{keep}}/rows.json",
    params:
        settings=stage_params("masking"),
        gather=gather_option,
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
        " --model {input.model} --data {input.data} --detections {output.detections} --rows {output.rows}{params.gather}"


if SHARDS > 1:

    rule masking_shard:
        input:
            code=code("sparsity", "evaluation"),
            model=f"{RESULTS}/model",
            data=f"{RESULTS}/data",
        output:
            detections=temp(directory(shard_output(MASKING_DETECTIONS))),
        params:
            settings=stage_params("masking"),
        log:
            f"{RESULTS}/logs/masking-{{method}}-{{keep}}-shard-{{shard}}.log",
        message:
            f"masking: {{wildcards.method}} keep-ratio {{wildcards.keep}}, shard {{wildcards.shard}} of {SHARDS}"
        wildcard_constraints:
            method="topk|random",
            keep=r"[0-9.]+",
            shard=r"\d+",
        threads: 1
        resources:
            cpu_slots=cpu_slots,
            **job_resources("masking"),
        shell:
            "python -m detr_sparsity --log {log} masking --method {wildcards.method} --keep-ratio {wildcards.keep}"
            " --model {input.model} --data {input.data} --detections {output.detections}"
            f" --shard {{wildcards.shard}}/{SHARDS}"
