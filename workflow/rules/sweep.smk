# Sweeps (README "Sweeps"; spectralar/sweep.py): each run of params.yaml's `sweeps.<name>` (a row, or a
# row at each of its `seeds`) runs under runs/<name>/<row>/ or runs/<name>/<row>/seed<k>/ with its own
# params file; the stages a seed's rows share (the proxy, the evaluation network, Table 1's
# correlation at that seed) run once under runs/<name>/seeds/seed<k>/. A run reuses the main
# pipeline's output of every stage whose params sections (and upstream stages) it leaves unchanged, as
# DVC's run cache would. The stages, their sections and their commands come from dvc.yaml, like the
# main rules (stages.smk): no command line is written twice.


wildcard_constraints:
    sweep="[A-Za-z0-9_-]+",
    run=RUN_PATTERN,


for _stage, _spec in PIPELINE.items():
    if _stage in NOT_SWEPT:
        continue

    rule:
        name:
            f"sweep_{_stage}"
        input:
            lambda w, stage=_stage: sweep_plan(w).inputs(stage),
        output:
            [sweep_output(out) for out in _spec.outs],
        params:
            sections=lambda w, stage=_stage: sweep_plan(w).sections(stage),
            command=lambda w, stage=_stage: sweep_plan(w).command(stage),
            which=lambda w: sweep_plan(w).arguments(),
            base=RESOLVED_PARAMS,
        threads: STAGE_THREADS
        resources:
            gpu=gpus(_stage),
        conda:
            "../envs/spectralar.yaml"
        log:
            f"logs/{{sweep}}/{{run}}/{_stage}.log",
        shell:
            "python -m spectralar.sweep --params {params.base} params {params.which} > {log} "
            "&& {params.command} 2>> {log}"


rule sweep_table:
    input:
        lambda w: table_inputs(PIPELINE, config, w.sweep),
    output:
        SWEEP_TABLE,
    params:
        rows=lambda w: config["sweeps"][w.sweep],
        base=RESOLVED_PARAMS,
    conda:
        "../envs/spectralar.yaml"
    log:
        "logs/{sweep}/table.log",
    shell:
        "python -m spectralar.sweep --params {params.base} table {wildcards.sweep} --out {output} > {log} 2>&1"


rule ablation:
    input:
        "runs/ablation/table.csv",
