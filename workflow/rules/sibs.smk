# One job per threshold of params.yaml's sweep (the summary asks for them).
SIBS_DETECTIONS = f"{RESULTS}/sibs/{{threshold}}/detections.json"


rule sibs:
    input:
        code=code("sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        profile=f"{RESULTS}/profile",
        shards=shard_partials(SIBS_DETECTIONS),
    output:
        detections=SIBS_DETECTIONS,
        row=f"{RESULTS}/sibs/{{threshold}}/row.json",
    params:
        settings=stage_params("sibs"),
        gather=gather_option,
    log:
        f"{RESULTS}/logs/sibs-{{threshold}}.log",
    message:
        f"sibs: skip neurons whose {CFG.sibs['indicator']} is below {{wildcards.threshold}}"
    wildcard_constraints:
        threshold=r"[0-9.eE+-]+",
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("sibs"),
    shell:
        "python -m detr_sparsity --log {log} sibs --threshold {wildcards.threshold} --model {input.model}"
        " --data {input.data} --profile {input.profile} --detections {output.detections} --row {output.row}"
        "{params.gather}"


if SHARDS > 1:

    rule sibs_shard:
        input:
            code=code("sparsity", "evaluation"),
            model=f"{RESULTS}/model",
            data=f"{RESULTS}/data",
            profile=f"{RESULTS}/profile",
        output:
            detections=temp(shard_output(SIBS_DETECTIONS)),
        params:
            settings=stage_params("sibs"),
        log:
            f"{RESULTS}/logs/sibs-{{threshold}}-shard-{{shard}}.log",
        message:
            f"sibs: threshold {{wildcards.threshold}}, shard {{wildcards.shard}} of {SHARDS}"
        wildcard_constraints:
            threshold=r"[0-9.eE+-]+",
            shard=r"\d+",
        threads: 1
        resources:
            cpu_slots=cpu_slots,
            **job_resources("sibs"),
        shell:
            "python -m detr_sparsity --log {log} sibs --threshold {wildcards.threshold} --model {input.model}"
            " --data {input.data} --profile {input.profile} --detections {output.detections}"
            f" --shard {{wildcards.shard}}/{SHARDS}"
