# One job per threshold of params.yaml's sweep (the summary asks for them).
rule sibs:
    input:
        code=code("sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        profile=f"{RESULTS}/profile",
    output:
        detections=f"{RESULTS}/sibs/{{threshold}}/detections.json",
        row=f"{RESULTS}/sibs/{{threshold}}/row.json",
    params:
        settings=stage_params("sibs"),
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
