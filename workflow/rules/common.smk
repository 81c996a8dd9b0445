# Shared helpers for the rules.
import os
from pathlib import Path

from spectralar.sweep import NOT_SWEPT, RowPlan, load_dag, sweep_rows


# Every stage but the report runs torch/numpy on all the cores it is given: a job asks for them all
# (Snakemake caps this at --cores), so two 2-thread jobs never share 2 cores (oversubscribed OpenMP
# threads ran stages up to 10x slower). On SLURM this becomes each job's CPU request.
STAGE_THREADS = 16


def section(*names):
    """The params sections a rule depends on, so that changing them reruns the rule."""
    return {name: config[name] for name in names}


def optional_input(path):
    """``path`` as an input only when it exists (a later run picks it up by its mtime)."""
    return [path] if os.path.exists(path) else []


# Sweeps (spectralar/sweep.py): the DAG, sections and commands come from dvc.yaml.
SWEEP_DAG = load_dag("dvc.yaml")
SWEEP_GPU_STAGES = {"train_proxy", "extract_proxy_codes", "train_tokenizer", "train_evalnet", "reference_stats",
                    "dump_tokens", "train_generator", "sample", "evaluate"}


def sweep_plan(wildcards):
    return RowPlan(SWEEP_DAG, config, wildcards.sweep, wildcards.row)


def sweep_output(out):
    path = f"runs/{{sweep}}/{{row}}/{out}"
    return directory(path) if not Path(out).suffix else path
