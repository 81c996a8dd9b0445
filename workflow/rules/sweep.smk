# Sweeps (README "Sweeps"; spectralar/sweep.py): each row of params.yaml's `sweeps.<name>` runs
# under runs/<name>/<row>/ with its own params file. A row reuses the main pipeline's output of every
# stage whose params sections (and upstream stages) it leaves unchanged, as DVC's run cache would.
# The stages, their sections and their commands come from dvc.yaml, like the main rules
# (stages.smk): no command line is written twice.


wildcard_constraints:
    sweep="[A-Za-z0-9_-]+",
    row="[A-Za-z0-9_-]+",


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
            base=RESOLVED_PARAMS,
        threads: STAGE_THREADS
        resources:
            gpu=gpus(_stage),
        conda:
            "../envs/spectralar.yaml"
        log:
            f"logs/{{sweep}}/{{row}}/{_stage}.log",
        shell:
            "python -m spectralar.sweep --params {params.base} params {wildcards.sweep} {wildcards.row} > {log} "
            "&& {params.command} 2>> {log}"


rule sweep_table:
    input:
        lambda w: [RowPlan(PIPELINE, config, w.sweep, row).metrics_file("evaluate") for row in sweep_rows(config, w.sweep)],
    output:
        SWEEP_TABLE,
    params:
        rows=lambda w: sweep_rows(config, w.sweep),
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
