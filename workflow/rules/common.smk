# Shared definitions of the generated rules. The pipeline is declared once, in dvc.yaml
# (spectralar/dag.py reads it); GPU use comes from the stage table of spectralar/stages/__init__.py.
import os

from spectralar.dag import command_paths, final_outputs, is_directory, load_dag, stage_inputs, stage_outputs
from spectralar.stages import GPU_STAGES
from spectralar.sweep import NOT_SWEPT, RowPlan, sweep_rows


PIPELINE = load_dag("dvc.yaml")  # stage name -> StageSpec (`DAG` would shadow Snakemake's own class)

# The stages run torch/numpy on all the cores they are given: a job asks for them all (Snakemake caps
# this at --cores), so two 2-thread jobs never share 2 cores (oversubscribed OpenMP threads ran
# stages up to 10x slower). The report, which computes little, asks for them too: nothing runs beside
# it in the main pipeline. On SLURM this becomes each job's CPU request.
STAGE_THREADS = 16

# Written by the sweep_table rule (sweep.smk); a stage command that passes one reads it if present.
SWEEP_TABLE = "runs/{sweep}/table.csv"


def gpus(stage):
    """GPUs a stage's job asks for: 1 for the stage table's GPU stages, 0 for the others and for a
    stage dvc.yaml declares but the table does not know yet (it then runs like a CPU stage)."""
    return 1 if stage in GPU_STAGES else 0


def section(*names):
    """The params sections a rule depends on, so that changing them reruns the rule."""
    return {name: config[name] for name in names}


def optional_input(path):
    """``path`` as an input only when it exists (a later run picks it up by its mtime)."""
    return [path] if os.path.exists(path) else []


def _one_or_all(paths):
    """A name's single path as itself (``input.data`` is the path ``--data`` passes), else the list."""
    return paths[0] if len(paths) == 1 else paths


def as_inputs(groups):
    return {name: _one_or_all(paths) for name, paths in groups.items()}


def as_outputs(groups):
    """Named outputs with dvc.yaml's directory outs marked as such for Snakemake."""
    return {name: _one_or_all([directory(path) if is_directory(path) else path for path in paths])
            for name, paths in groups.items()}


def sweep_table_inputs(spec):
    """The sweep tables a stage's command passes (the report's ``--ablation runs/ablation/table.csv``),
    as inputs once a sweep has written them. DVC does not track them (no sweep runs inside dvc repro)."""
    tables = {SWEEP_TABLE.format(sweep=name) for name in config.get("sweeps") or {}}
    return {flag: optional_input(path) for flag, path in command_paths(spec.cmd).items() if path in tables}


# Sweeps (spectralar/sweep.py): the row's paths and params file on the same DAG.
def sweep_plan(wildcards):
    return RowPlan(PIPELINE, config, wildcards.sweep, wildcards.row)


def sweep_output(out):
    path = f"runs/{{sweep}}/{{row}}/{out}"
    return directory(path) if is_directory(out) else path
