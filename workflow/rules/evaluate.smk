EVALUATE_DETECTIONS = f"{RESULTS}/evaluate/{{method}}/detections.json"


rule evaluate:
    input:
        code=code("evaluation", "sparsity"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        shards=shard_partials(EVALUATE_DETECTIONS),
    output:
        detections=EVALUATE_DETECTIONS,
        row=f"{RESULTS}/evaluate/{{method}}/row.json",
    params:
        settings=stage_params("evaluate"),
        gather=gather_option,
    log:
        f"{RESULTS}/logs/evaluate-{{method}}.log",
    wildcard_constraints:
        method=r"[^/]+",
    message:
        f"evaluate: COCO AP of method {{wildcards.method}} on the {STUDY} study"
    conda:
        "../envs/study.yaml"
    # One thread, as every evaluation job: matmuls split over another thread count round differently, and the
    # sanity points (top-k at keep-ratio 1, SIBS at threshold 0) must reproduce dense bit for bit.
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("evaluate"),
    shell:
        "python -m detr_sparsity --log {log} evaluate --method {wildcards.method} --model {input.model}"
        " --data {input.data} --detections {output.detections} --row {output.row}{params.gather}"


if SHARDS > 1:

    rule evaluate_shard:
        input:
            code=code("evaluation", "sparsity"),
            model=f"{RESULTS}/model",
            data=f"{RESULTS}/data",
        output:
            detections=temp(shard_output(EVALUATE_DETECTIONS)),
        params:
            settings=stage_params("evaluate"),
        log:
            f"{RESULTS}/logs/evaluate-{{method}}-shard-{{shard}}.log",
        message:
            f"evaluate: method {{wildcards.method}}, shard {{wildcards.shard}} of {SHARDS}"
        wildcard_constraints:
            method=r"[^/]+",
            shard=r"\d+",
        threads: 1
        resources:
            cpu_slots=cpu_slots,
            **job_resources("evaluate"),
        shell:
            "python -m detr_sparsity --log {log} evaluate --method {wildcards.method} --model {input.model}"
            f" --data {{input.data}} --detections {{output.detections}} --shard {{wildcards.shard}}/{SHARDS}"
