# Shared definitions of the generated rules. The pipeline is declared once, in dvc.yaml
# (spectralar/dag.py reads it); GPU use comes from the stage table of spectralar/stages/__init__.py.
import os

import yaml
from snakemake.exceptions import WorkflowError

from spectralar.config import ConfigError, load_params, read_yaml
from spectralar.dag import command_paths, final_outputs, is_directory, load_dag, report_entry, stage_inputs, stage_outputs
from spectralar.stages import GPU_STAGES
from spectralar.sweep import NOT_SWEPT, RUN_PATTERN, RowPlan, sweep_rows, table_inputs


PIPELINE = load_dag("dvc.yaml")  # stage name -> StageSpec (`DAG` would shadow Snakemake's own class)

# Snakemake's configuration is params.yaml, then any --configfile, then any --config overrides (later
# wins, key by key). Every stage reads one params file: when the resolved configuration differs from
# params.yaml, it is written to runs/params/snakemake.yaml, checked by the strict loader, and the
# commands read that file instead. The rules' params sections rerun exactly the stages whose sections
# changed, and what follows them (stages.smk). dvc.yaml and DVC keep reading params.yaml.
PARAMS_FILE = "params.yaml"
RESOLVED_FILE = "runs/params/snakemake.yaml"


def _typed(value, base):
    """--config hands nested values over as strings (``generator={"depth": 6}`` gives "6"): read
    every changed string as YAML, as params.yaml's own values are read."""
    if isinstance(value, dict):
        base = base if isinstance(base, dict) else {}
        return {key: _typed(item, base.get(key)) for key, item in value.items()}
    if isinstance(value, str) and value != base:
        parsed = yaml.safe_load(value) if value.strip() else value
        return value if parsed is None else parsed
    return value


def resolved_params_file(config):
    """The params file the stages read: params.yaml, or the resolved configuration written out.
    Snakemake's ``config`` is updated in place with the typed values."""
    try:
        base = read_yaml(PARAMS_FILE)  # a key written twice is an error, as in the stages' loader
    except ConfigError as err:
        raise WorkflowError(str(err))
    resolved = _typed(dict(config), base)
    config.update(resolved)
    if resolved == base:
        return PARAMS_FILE
    text = yaml.safe_dump(resolved, sort_keys=False)
    os.makedirs(os.path.dirname(RESOLVED_FILE), exist_ok=True)
    with open(f"{RESOLVED_FILE}.tmp", "w") as handle:
        handle.write(text)
    try:
        load_params(f"{RESOLVED_FILE}.tmp")
    except ConfigError as err:
        raise WorkflowError(f"the configuration (params.yaml + --configfile + --config) is not valid: {err}")
    os.replace(f"{RESOLVED_FILE}.tmp", RESOLVED_FILE)
    return RESOLVED_FILE


RESOLVED_PARAMS = resolved_params_file(config)


def stage_command(spec):
    """dvc.yaml's command, reading the resolved params file."""
    if RESOLVED_PARAMS == PARAMS_FILE:
        return spec.cmd
    if f"--params {PARAMS_FILE}" not in spec.cmd:
        raise WorkflowError(f"{spec.name}: its dvc.yaml command does not pass --params {PARAMS_FILE}")
    return spec.cmd.replace(f"--params {PARAMS_FILE}", f"--params {RESOLVED_PARAMS}")

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


def as_output(path):
    """A dvc.yaml out for Snakemake: a directory marked as such; a result marked for
    ``snakemake --report`` with its caption and category (spectralar.dag.REPORT_OUTPUTS)."""
    output = directory(path) if is_directory(path) else path
    entry = report_entry(path)
    if entry is None:
        return output
    return report(output, caption=os.path.join(workflow.basedir, entry.caption), category=entry.category,
                  subcategory=entry.subcategory, labels=entry.labels() or None, patterns=list(entry.patterns))


def as_outputs(groups):
    """Named outputs of a stage, each made by :func:`as_output`."""
    return {name: _one_or_all([as_output(path) for path in paths]) for name, paths in groups.items()}


def sweep_table_inputs(spec):
    """The sweep tables a stage's command passes (the report's ``--ablation runs/ablation/table.csv``),
    as inputs once a sweep has written them. DVC does not track them (no sweep runs inside dvc repro)."""
    tables = {SWEEP_TABLE.format(sweep=name) for name in config.get("sweeps") or {}}
    return {flag: optional_input(path) for flag, path in command_paths(spec.cmd).items() if path in tables}


# Sweeps (spectralar/sweep.py): a run's paths and params file on the same DAG. {run} is the run's
# folder below runs/<sweep>/: <row>, <row>/seed<k>, or seeds/seed<k> (the stages seed k's rows share).
def sweep_plan(wildcards):
    return RowPlan.of_run(PIPELINE, config, wildcards.sweep, wildcards.run)


def sweep_output(out):
    path = f"runs/{{sweep}}/{{run}}/{out}"
    return directory(path) if is_directory(out) else path
