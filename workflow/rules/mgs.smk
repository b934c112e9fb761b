# MGS: the frozen front end of the training images once, then one gate set per objective and target of
# params.yaml's mgs section (the summary asks for their rows), each evaluated like every other method.
MGS_OBJECTIVE = "task|distillation|oracle"
MGS_TARGET = r"0\.[0-9]+"


rule mgs_cache:
    input:
        code=code("mgs", "sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
    output:
        f"{RESULTS}/mgs/cache/front_end.safetensors",
    params:
        settings=stage_params("mgs_cache"),
    log:
        f"{RESULTS}/logs/mgs-cache.log",
    message:
        "mgs_cache: backbone features and dense outputs of the gate-training images, computed once"
    conda:
        "../envs/study.yaml"
    threads: MAX_THREADS
    resources:
        cpu_slots=cpu_slots,
        **job_resources("mgs_cache"),
    shell:
        "python -m detr_sparsity --log {log} mgs-cache --model {input.model} --data {input.data} --out {output}"


rule mgs_train:
    input:
        code=code("mgs", "sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        cache=rules.mgs_cache.output[0],
    output:
        gates=f"{RESULTS}/mgs/{{objective}}/{{target}}/gates.safetensors",
        training=f"{RESULTS}/mgs/{{objective}}/{{target}}/training.json",
    params:
        settings=stage_params("mgs_train"),
    log:
        f"{RESULTS}/logs/mgs-train-{{objective}}-{{target}}.log",
    message:
        f"mgs_train: {{wildcards.objective}} gates of {CFG.mgs['group_size']} neurons toward {{wildcards.target}} induced sparsity"
    wildcard_constraints:
        objective=MGS_OBJECTIVE,
        target=MGS_TARGET,
    conda:
        "../envs/study.yaml"
    # Targets train as parallel jobs of one thread each: the gates are small, and one thread per target
    # uses the cores better than several threads on one target.
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("mgs_train"),
    shell:
        "python -m detr_sparsity --log {log} mgs-train --objective {wildcards.objective} --target {wildcards.target}"
        " --model {input.model}"
        " --cache {input.cache} --gates {output.gates} --training {output.training}"


MGS_DETECTIONS = f"{RESULTS}/mgs/{{objective}}/{{target}}/detections.json"


rule mgs_evaluate:
    input:
        code=code("mgs", "sparsity", "evaluation"),
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        gates=rules.mgs_train.output.gates,
        training=rules.mgs_train.output.training,
        shards=shard_partials(MGS_DETECTIONS),
    output:
        detections=MGS_DETECTIONS,
        row=f"{RESULTS}/mgs/{{objective}}/{{target}}/row.json",
    params:
        settings=stage_params("mgs_evaluate"),
        gather=gather_option,
    log:
        f"{RESULTS}/logs/mgs-evaluate-{{objective}}-{{target}}.log",
    message:
        "mgs_evaluate: the {wildcards.objective} gates of target {wildcards.target} on the evaluation split"
    wildcard_constraints:
        objective=MGS_OBJECTIVE,
        target=MGS_TARGET,
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        cpu_slots=cpu_slots,
        **job_resources("mgs_evaluate"),
    shell:
        "python -m detr_sparsity --log {log} mgs-evaluate --objective {wildcards.objective} --target {wildcards.target}"
        " --model {input.model}"
        " --data {input.data} --gates {input.gates} --training {input.training}"
        " --detections {output.detections} --row {output.row}{params.gather}"


if SHARDS > 1:

    rule mgs_evaluate_shard:
        input:
            code=code("mgs", "sparsity", "evaluation"),
            model=f"{RESULTS}/model",
            data=f"{RESULTS}/data",
            gates=rules.mgs_train.output.gates,
            training=rules.mgs_train.output.training,
        output:
            detections=temp(shard_output(MGS_DETECTIONS)),
        params:
            settings=stage_params("mgs_evaluate"),
        log:
            f"{RESULTS}/logs/mgs-evaluate-{{objective}}-{{target}}-shard-{{shard}}.log",
        message:
            f"mgs_evaluate: {{wildcards.objective}} gates of target {{wildcards.target}}, shard {{wildcards.shard}} of {SHARDS}"
        wildcard_constraints:
            objective=MGS_OBJECTIVE,
            target=MGS_TARGET,
            shard=r"\d+",
        threads: 1
        resources:
            cpu_slots=cpu_slots,
            **job_resources("mgs_evaluate"),
        shell:
            "python -m detr_sparsity --log {log} mgs-evaluate --objective {wildcards.objective} --target {wildcards.target}"
            " --model {input.model} --data {input.data} --gates {input.gates} --training {input.training}"
            f" --detections {{output.detections}} --shard {{wildcards.shard}}/{SHARDS}"
