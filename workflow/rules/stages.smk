# Every stage of the pipeline's declaration (src/detr_sparsity/pipeline.py) as a rule: its inputs (its code
# dependencies from the import graph among them), outputs, params, log and command all come from there;
# dvc.yaml is generated from the same declaration. An evaluating stage also gets a `<stage>_shard` rule when
# the study shards its evaluations.
from detr_sparsity.pipeline import STAGES, render, stage_params

for stage in STAGES:
    COMMANDS[stage.name] = snakemake_command(stage)
    message = render(stage.message, study=STUDY, **{a.name: f"{{wildcards.{a.name}}}" for a in stage.sweep})

    rule:
        name: stage.name
        input:
            **inputs(stage),
            **({"shards": shard_partials(at(stage.outputs[stage.detections]))} if stage.shardable else {}),
        output:
            **outputs(stage),
        params:
            settings=stage_params(CFG, stage.name),
            **({"gather": gather_option} if stage.shardable else {}),
            **REPORT_PARAMS.get(stage.name, {}),
        log:
            at(stage.log()),
        message:
            message
        wildcard_constraints:
            **{axis.name: axis.pattern for axis in stage.sweep},
        conda:
            "../envs/study.yaml"
        # Evaluations run on one thread: matmuls split over another thread count round differently, and the sanity
        # points (top-k at keep-ratio 1, SIBS at threshold 0) must reproduce dense bit for bit.
        threads: stage.threads or MAX_THREADS
        priority: stage.priority
        resources:
            cpu_slots=all_cpu_slots if stage.exclusive else cpu_slots,
            **CFG.job_resources(stage.name),
        shell:
            command_for(locals(), stage.name)

    if stage.shardable and SHARDS > 1:
        detections = stage.outputs[stage.detections]
        output = shard_output(at(detections))
        COMMANDS[f"{stage.name}_shard"] = snakemake_command(stage, shard=f"{{wildcards.shard}}/{SHARDS}")

        rule:
            name: f"{stage.name}_shard"
            input:
                **inputs(stage),
            output:
                **{stage.detections: temp(directory(output) if stage.detections in stage.directories else output)},
            params:
                settings=stage_params(CFG, stage.name),
            log:
                at(stage.log(shard=True)),
            message:
                f"{message}, shard {{wildcards.shard}} of {SHARDS}"
            wildcard_constraints:
                shard=r"\d+",
                **{axis.name: axis.pattern for axis in stage.sweep},
            conda:
                "../envs/study.yaml"
            threads: 1
            priority: stage.priority
            resources:
                cpu_slots=cpu_slots,
                **CFG.job_resources(stage.name),
            shell:
                command_for(locals(), f"{stage.name}_shard")
