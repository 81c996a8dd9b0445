# One rule per dvc.yaml stage, generated (rule name = stage name = `python -m spectralar <stage>`):
# the command is dvc.yaml's, inputs and outputs are its deps and outs named after the flags that pass
# them (`--data data/prepared` -> input.data; the package's code -> input.code; `--metrics` ->
# output.metrics), and `params` holds the stage's params sections and its command, so that changing
# either reruns it (as DVC does). With --configfile/--config the command reads the resolved params
# file (common.smk).
# A new stage in dvc.yaml is a new rule here with no edit.


for _stage, _spec in PIPELINE.items():

    rule:
        name:
            _stage
        input:
            **as_inputs(stage_inputs(PIPELINE, _stage)),
            **sweep_table_inputs(_spec),
        output:
            **as_outputs(stage_outputs(PIPELINE, _stage)),
        params:
            sections=section(*_spec.sections),
            declared=_spec.cmd,  # dvc.yaml's command: a change reruns the rule, as in DVC
            # what runs: the same command reading the resolved params file. A function of `output` is
            # a derived param for Snakemake, not a rerun trigger, so running with --config reruns only
            # the stages whose sections the overrides change (through `sections`).
            command=lambda wildcards, output, spec=_spec: stage_command(spec),
        threads: STAGE_THREADS
        resources:
            gpu=gpus(_stage),
        conda:
            "../envs/spectralar.yaml"
        log:
            f"logs/{_stage}.log",
        shell:
            # a literal: Snakemake evaluates this expression again when the job runs, after the loop
            "{params.command} 2> {log}"
