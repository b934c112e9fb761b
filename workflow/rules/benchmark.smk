# Measured speed of sparse FFN execution (dense vs SIBS shrunk vs MGS sparse kernel), per FFN block kind and
# end to end, at the study's shapes and DETR-R50's (params.yaml's benchmark section).


rule benchmark:
    input:
        code=code("execution", "sparsity", "mgs", "models", "evaluation"),
        benchmarks=["benchmarks/speed.py", "benchmarks/environment.py"],
        model=f"{RESULTS}/model",
        data=f"{RESULTS}/data",
        profile=f"{RESULTS}/profile",
        gates=expand(f"{RESULTS}/mgs/{CFG.benchmark['objective']}/{{target}}/gates.safetensors",
                     target=CFG.mgs["targets"]),
    output:
        f"{RESULTS}/benchmark/speed.json",
    params:
        settings=stage_params("benchmark"),
        # results/<study>/mgs: the gate files are <mgs>/<objective>/<target>/gates.safetensors
        mgs=lambda wildcards, input: os.path.dirname(os.path.dirname(os.path.dirname(input.gates[0]))),
    log:
        f"{RESULTS}/logs/benchmark.log",
    message:
        f"benchmark: dense vs SIBS vs MGS sparse execution, median ms over {CFG.benchmark['repeats']} runs, "
        f"{CFG.benchmark['threads']} threads"
    conda:
        "../envs/study.yaml"
    # Timings want the machine to themselves: the job claims every core, so nothing runs beside it.
    threads: MAX_THREADS
    resources:
        cpu_slots=lambda wildcards, threads: os.cpu_count() or 1,
        **job_resources("benchmark"),
    shell:
        "python -m detr_sparsity --log {log} benchmark --model {input.model} --data {input.data}"
        " --profile {input.profile} --mgs {params.mgs} --out {output}"
