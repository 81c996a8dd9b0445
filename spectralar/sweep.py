"""Parameter sweeps: the paper's Table 4 ablation and any other, in both orchestrators.

params.yaml's ``sweeps`` section maps a sweep name to its rows; a row is a mapping of dotted params
keys to values, i.e. exactly the ``-S key=value`` overrides of ``dvc exp run``. An optional ``seeds``
list repeats every row at each ``run.seed`` (the same seeds for every row), so that a table can give
mean ± standard deviation instead of one draw::

    sweeps:
      ablation:                                   # Table 4
        seeds: [0, 1, 2]                          # optional: a row x seed grid
        baseline: {tokenizer.spectral_supervision: false, tokenizer.causal_mask: false, ...}
        ...

A *run* is one (row, seed). Snakemake (``snakemake ablation``, ``snakemake runs/<sweep>/table.csv``)
runs each under ``runs/<sweep>/<row>/`` (a sweep without seeds) or ``runs/<sweep>/<row>/seed<k>/``
with that run's params file. Like DVC's run cache, a run reuses every stage output whose params
sections (and upstream stages) it leaves unchanged: a generator-depth sweep retrains no tokenizer.
What depends on the seed but not on the row (the proxy, the evaluation network, Table 1's
correlation at seed k) runs once per seed under ``runs/<sweep>/seeds/seed<k>/`` and is shared by
that seed's rows; at params.yaml's own seed it is the main pipeline's. Nothing that depends on the
seed is shared across seeds; ``prepare`` reads no seed (:data:`SEED_FREE`, tested) and is shared by
all. The DAG, the stages' params sections and their command lines are read from ``dvc.yaml``, the one
description both orchestrators are held to (tests/test_orchestration.py), so this module never
restates the pipeline.

DVC: ``python -m spectralar.sweep run ablation`` runs one ``dvc exp run --temp -n <name> -S ...`` per run
(``<sweep>-<row>``, or ``<sweep>-<row>-seed<k>`` with ``-S run.seed=k``), one after another in the
foreground, each in its own temporary copy of the workspace; ``queue`` puts the same runs in DVC's queue
(``dvc exp run --queue``) for ``dvc queue start`` / ``dvc exp run --run-all``, whose celery worker can
stop taking tasks after one or two (a JSONDecodeError in its filesystem broker, treeverse/dvc#10398 and
#10428, open). ``python -m spectralar.sweep collect ablation`` then reads the experiments' metrics (``dvc
exp show --json``) into the same ``runs/<sweep>/table.csv``.

``table`` writes ``runs/<sweep>/table.csv``: one line per run with the row, the overridden keys, the
seed and the run's metrics (:func:`run_values`: evaluate's headline metrics and truncated FIDs, the
generator's validation loss and accuracy, Table 1's R²); the report stage averages them over seeds.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

from spectralar.config import ConfigError, read_yaml
from spectralar.dag import StageSpec, code_files, load_dag, producer, topological_order, upstream  # noqa: F401 (re-exported)
from spectralar.evaluation.headline import HEADLINE_METRICS

SWEEP_ROOT = "runs"
PARAMS_FILE = "params.yaml"
NOT_SWEPT = ("prepare", "report")  # shared by every row; a row that changes them is an error
# Sweep and row names become folders (runs/<sweep>/<row>/) and DVC experiment names: no "/" or ".."
NAME = re.compile(r"[A-Za-z0-9_-]+")
SEEDS = "seeds"  # the key of a sweep's seed list (so no row can be named so), and the folder of its per-seed runs
# The key of a sweep's common overrides, applied to every run before its row's (so no row can be named
# so): e.g. a shorter training schedule that every row of Table 4 shares, so the rows differ only in
# their own switches and the whole grid fits a time budget.
SCHEDULE = "schedule"
RESERVED = (SEEDS, SCHEDULE)
SEED_KEY = "run.seed"
# Stages whose outputs do not depend on run.seed (prepare never reads it: a test runs it at two seeds
# and compares the bytes), so a seed's runs share the main pipeline's output although `run` changed.
SEED_FREE = ("prepare",)
# The run folder below runs/<sweep>/: "<row>", "<row>/seed<k>", or "seeds/seed<k>" (a seed's shared
# stages). RUN_PATTERN has no groups: it is the Snakemake wildcard's constraint.
RUN_PATTERN = r"[A-Za-z0-9_-]+(?:/seed[0-9]+)?"
RUN_ID = re.compile(r"(?P<row>[A-Za-z0-9_-]+)(?:/seed(?P<seed>[0-9]+))?")
# The metrics files a run's line of the sweep table reads (see run_values)
RUN_METRICS = ("evaluate", "train_generator", "correlation")
GENERATOR_METRICS = ("val_loss", "val_accuracy")

Key = Union[str, tuple[str, int]]  # a run: its row (sweep without seeds) or (row, seed)


class SweepError(ValueError):
    """A sweep or row that does not exist, or an override that does not fit params.yaml."""


# --------------------------------------------------------------------------------------------
# Rows, seeds and their params
# --------------------------------------------------------------------------------------------

def sweep_definition(params: Mapping[str, Any], sweep: str) -> tuple[dict[str, dict[str, Any]], Optional[list[int]]]:
    """(rows, seeds) of ``sweeps.<sweep>``; seeds is None for a sweep without a ``seeds`` list (one run
    per row at params' own seed, the layout sweeps had before seeds existed). A sweep or row name that
    is not a plain folder name is refused, since it becomes the path ``runs/<sweep>/<row>/`` (``../../x``
    would write outside the project)."""
    sweeps = params.get("sweeps") or {}
    if sweep not in sweeps:
        raise SweepError(f"sweeps.{sweep}: no such sweep in params (sweeps: {', '.join(sorted(sweeps)) or 'none'})")
    rows = dict(sweeps[sweep])
    seeds = rows.pop(SEEDS, None)
    schedule = rows.pop(SCHEDULE, None)
    if schedule is not None and (not isinstance(schedule, Mapping) or SEED_KEY in schedule):
        raise SweepError(f"sweeps.{sweep}.{SCHEDULE}: expected a mapping of params keys to values that every run "
                         f"shares (not {SEED_KEY}), got {schedule!r}")
    for where, name in [(f"sweeps.{sweep}", sweep)] + [(f"sweeps.{sweep}.{row}", row) for row in rows]:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}: name {name!r} may only hold letters, digits, '_' and '-' "
                              f"(it names the folder {SWEEP_ROOT}/<sweep>/<row>/ and the DVC experiment <sweep>-<row>)")
    for row, overrides in rows.items():
        if not isinstance(overrides, Mapping):
            raise SweepError(f"sweeps.{sweep}.{row}: expected a mapping of params keys to values, got {overrides!r} "
                             f"(only `{SEEDS}` holds a list)")
    if not rows:
        raise SweepError(f"sweeps.{sweep}: no rows (only {', '.join(RESERVED)})")
    if seeds is None:
        return rows, None
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f"sweeps.{sweep}.{SEEDS}: expected a non-empty list of distinct integers >= 0 "
                         f"(the run.seed of each repeat), got {seeds!r}")
    for row, overrides in rows.items():
        if SEED_KEY in overrides:
            raise SweepError(f"sweeps.{sweep}.{row}: sets {SEED_KEY}, which sweeps.{sweep}.{SEEDS} sets for every row")
    return rows, list(seeds)


def sweep_rows(params: Mapping[str, Any], sweep: str) -> dict[str, dict[str, Any]]:
    """The rows of ``sweeps.<sweep>`` (its ``seeds`` list left out)."""
    return sweep_definition(params, sweep)[0]


def sweep_seeds(params: Mapping[str, Any], sweep: str) -> Optional[list[int]]:
    return sweep_definition(params, sweep)[1]


def sweep_schedule(params: Mapping[str, Any], sweep: str) -> dict[str, Any]:
    """``sweeps.<sweep>.schedule``: the overrides every run of the sweep shares, applied before the
    row's own (a row may override them too); empty when the sweep has none. Its runs then differ from
    the main pipeline in these keys, so no run reuses a stage they change."""
    sweep_definition(params, sweep)  # validated there
    return dict(params["sweeps"][sweep].get(SCHEDULE) or {})


def sweep_runs(params: Mapping[str, Any], sweep: str) -> list[tuple[str, Optional[int]]]:
    """Every (row, seed) of the sweep, rows outer; seed None for a sweep without seeds."""
    rows, seeds = sweep_definition(params, sweep)
    return [(row, seed) for row in rows for seed in (seeds or [None])]


def run_key(row: str, seed: Optional[int]) -> Key:
    return row if seed is None else (row, seed)


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any], where: str = "row") -> dict[str, Any]:
    """A deep copy of ``params`` with ``{"section.key": value}`` set; every key must already exist."""
    out = copy.deepcopy(dict(params))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise SweepError(f"{where}: override {dotted!r} names no params key")
            node = node[key]
        if not isinstance(node, dict) or leaf not in node:
            raise SweepError(f"{where}: override {dotted!r} names no params key")
        node[leaf] = value
    return out


def run_dir(sweep: str, row: Optional[str], seed: Optional[int] = None) -> str:
    """``runs/<sweep>/<row>``, ``runs/<sweep>/<row>/seed<k>``, or ``runs/<sweep>/seeds/seed<k>`` (row None:
    the stages seed k's rows share)."""
    if row is None:
        return f"{SWEEP_ROOT}/{sweep}/{SEEDS}/seed{seed}"
    return f"{SWEEP_ROOT}/{sweep}/{row}" + ("" if seed is None else f"/seed{seed}")


def row_dir(sweep: str, row: str) -> str:
    return run_dir(sweep, row)


def row_params_path(sweep: str, row: Optional[str], seed: Optional[int] = None) -> str:
    return f"{run_dir(sweep, row, seed)}/{PARAMS_FILE}"


def parse_run(run: str) -> tuple[Optional[str], Optional[int]]:
    """(row, seed) of a run folder below ``runs/<sweep>/`` (the Snakemake wildcard ``{run}``)."""
    match = RUN_ID.fullmatch(run)
    if match is None:
        raise SweepError(f"{run!r} is not a sweep run folder (<row>, <row>/seed<k> or {SEEDS}/seed<k>)")
    seed = None if match["seed"] is None else int(match["seed"])
    if match["row"] == SEEDS:
        if seed is None:
            raise SweepError(f"{run!r}: the folder {SEEDS}/ holds one folder per seed, seed<k>")
        return None, seed
    return match["row"], seed


def run_params(base: Mapping[str, Any], sweep: str, row: Optional[str], seed: Optional[int]) -> dict[str, Any]:
    """``base`` with the row's overrides and ``run.seed = seed``; row None: the seed alone. A seed that
    is not in the sweep's list, or one given to a sweep without seeds, is refused."""
    rows, seeds = sweep_definition(base, sweep)
    if row is not None and row not in rows:
        raise SweepError(f"sweeps.{sweep}.{row}: no such row (rows: {', '.join(rows)})")
    if seeds is None and seed is not None:
        raise SweepError(f"sweeps.{sweep} has no `{SEEDS}` list: its rows run once, at {SEED_KEY} of params")
    if seeds is not None and seed not in seeds:
        raise SweepError(f"sweeps.{sweep}: seed {seed!r} is not one of its seeds {seeds}")
    if row is None and seed is None:
        raise SweepError(f"sweeps.{sweep}: a run needs a row, a seed, or both")
    where = f"sweeps.{sweep}.{row if row is not None else SEEDS}"
    params = apply_overrides(base, sweep_schedule(base, sweep), f"sweeps.{sweep}.{SCHEDULE}")
    params = apply_overrides(params, {SEED_KEY: seed}, where) if seed is not None else params
    return apply_overrides(params, rows[row], where) if row is not None else params


def write_row_params(params_file: str | Path, sweep: str, row: Optional[str], out: Optional[str | Path] = None,
                     *, seed: Optional[int] = None) -> Path:
    """Write a run's complete params file (validated by the strict loader) and return its path."""
    from spectralar.config import load_params
    from spectralar.io import write_text

    base = read_yaml(params_file)
    params = run_params(base, sweep, row, seed)
    params["sweeps"] = {}  # a run sweeps nothing; and editing another row leaves this file unchanged
    out = Path(out or row_params_path(sweep, row, seed))
    changes = {**sweep_schedule(base, sweep), **(sweep_rows(base, sweep)[row] if row is not None else {}),
               **({SEED_KEY: seed} if seed is not None else {})}
    name = run_dir(sweep, row, seed).removeprefix(f"{SWEEP_ROOT}/")
    header = f"# {name}: {params_file} with {json.dumps(changes)} (written by spectralar.sweep)\n"
    write_text(out, header + yaml.safe_dump(params, sort_keys=False))
    load_params(out)  # a bad value fails here, with its key path, before any stage runs
    return out


# --------------------------------------------------------------------------------------------
# Which stages a row reruns (the DAG itself: spectralar.dag)
# --------------------------------------------------------------------------------------------

def _stage_values(dag: Mapping[str, StageSpec], params: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The params a stage's output depends on: its sections, less run.seed for a :data:`SEED_FREE` stage."""
    values = {section: params.get(section) for section in dag[stage].sections}
    if stage in SEED_FREE and isinstance(values.get("run"), Mapping):
        values["run"] = {key: value for key, value in values["run"].items() if key != "seed"}
    return values


def row_specific_stages(dag: Mapping[str, StageSpec], base: Mapping[str, Any],
                        row: Mapping[str, Any]) -> set[str]:
    """Stages whose params sections differ between ``row`` and ``base``, and everything downstream."""
    changed: set[str] = set()
    for name in topological_order(dag):
        if _stage_values(dag, base, name) != _stage_values(dag, row, name) or upstream(dag, name) & changed:
            changed.add(name)
    return changed


# --------------------------------------------------------------------------------------------
# One run's plan: which stages it runs, with which paths
# --------------------------------------------------------------------------------------------

class RowPlan:
    """Paths and commands of one run of a sweep: a row (at a seed, for a sweep with seeds), or a seed
    alone (``row=None``: the stages that seed's rows share).

    Each stage is at one of three levels. *main*: the run leaves its params and upstream unchanged, so
    it reuses the main pipeline's output. *seed*: only ``run.seed`` changes it; it lives under
    ``runs/<sweep>/seeds/seed<k>/`` and every row at seed k reads it. *row*: the row's overrides change
    it; it lives under the run's own folder. :attr:`specific` is the set this plan's jobs run.
    """

    def __init__(self, dag: Mapping[str, StageSpec], base: Mapping[str, Any], sweep: str, row: Optional[str],
                 seed: Optional[int] = None) -> None:
        self.dag, self.sweep, self.row, self.seed = dag, sweep, row, seed
        self.params = run_params(base, sweep, row, seed)
        seeded = run_params(base, sweep, None, seed) if seed is not None else base
        self.seed_stages = row_specific_stages(dag, base, seeded)
        self.row_stages = row_specific_stages(dag, seeded, self.params) if row is not None else set()
        self.seed_stages -= self.row_stages
        shared = sorted((self.seed_stages | self.row_stages) & set(NOT_SWEPT) - {"report"})
        if shared:
            raise SweepError(f"sweeps.{sweep}.{row}: changes the params of {', '.join(shared)}, which every row "
                             f"shares; sweep such sections with `dvc exp run -S` instead")
        self.seed_stages.discard("report")
        self.row_stages.discard("report")
        self.specific = self.row_stages if row is not None else self.seed_stages
        self.prefix = run_dir(sweep, row, seed)
        self.params_file = row_params_path(sweep, row, seed)

    @classmethod
    def of_run(cls, dag: Mapping[str, StageSpec], base: Mapping[str, Any], sweep: str, run: str) -> "RowPlan":
        """The plan of a run folder below ``runs/<sweep>/`` (:func:`parse_run`)."""
        return cls(dag, base, sweep, *parse_run(run))

    @property
    def run_id(self) -> str:
        """This run's folder below ``runs/<sweep>/``."""
        return self.prefix.removeprefix(f"{SWEEP_ROOT}/{self.sweep}/")

    def arguments(self) -> str:
        """``<sweep> [<row>] [--seed k]``: what ``python -m spectralar.sweep params`` takes for this run."""
        words = [self.sweep] + ([self.row] if self.row is not None else []) + (
            ["--seed", str(self.seed)] if self.seed is not None else [])
        return shlex.join(words)

    def level(self, stage: str) -> str:
        return "row" if stage in self.row_stages else "seed" if stage in self.seed_stages else "main"

    def path(self, path: str) -> str:
        """Where ``path`` (a stage output, or a file inside one) lives for this run."""
        made_by = producer(self.dag, path)
        level = "main" if made_by is None else self.level(made_by[0])
        if level == "row":
            return f"{self.prefix}/{path}"
        if level == "seed":
            return f"{run_dir(self.sweep, None, self.seed)}/{path}"
        return path

    def input_path(self, path: str) -> str:
        """Like :meth:`path`, but a file inside a stage's directory output becomes that directory
        (Snakemake matches a rule's outputs, not files inside them)."""
        made_by = producer(self.dag, path)
        return self.path(made_by[1]) if made_by is not None else path

    def inputs(self, stage: str) -> list[str]:
        """The stage's deps for this run; the package's code as its files (``dag.code_files``)."""
        paths = set()
        for dep in self.dag[stage].deps:
            paths.update(code_files(dep) if producer(self.dag, dep) is None else [self.input_path(dep)])
        return sorted(paths)

    def sections(self, stage: str) -> dict[str, Any]:
        """The run's values of the params sections ``stage`` reads (a change reruns it)."""
        return {name: self.params[name] for name in self.dag[stage].sections}

    def command(self, stage: str) -> str:
        """dvc.yaml's command with this run's params file and paths; private paths (checkpoints) move too."""
        if stage not in self.specific:
            owner = (f"seed {self.seed}'s shared {stage} ({run_dir(self.sweep, None, self.seed)})"
                     if self.level(stage) == "seed" else f"the main pipeline's {stage}")
            raise SweepError(f"{self.sweep}/{self.run_id} reuses {owner}; nothing to run")
        words = shlex.split(self.dag[stage].cmd)
        for i in range(1, len(words)):
            if not words[i - 1].startswith("--") or words[i].startswith("--"):
                continue
            if words[i - 1] == "--params":
                words[i] = self.params_file
            elif producer(self.dag, words[i]) is not None:
                words[i] = self.path(words[i])
            else:  # a path of the stage's own that no stage declares (e.g. --checkpoints)
                words[i] = f"{self.prefix}/{words[i]}"
        return shlex.join(words)

    def metrics_file(self, stage: str) -> str:
        return self.path(f"metrics/{stage}.json")


def table_inputs(dag: Mapping[str, StageSpec], base: Mapping[str, Any], sweep: str) -> list[str]:
    """The metrics files the sweep's table reads (:data:`RUN_METRICS` of every run): Snakemake's
    inputs of ``runs/<sweep>/table.csv``, so that the seed-level correlation runs too."""
    files = {RowPlan(dag, base, sweep, row, seed).metrics_file(stage)
             for row, seed in sweep_runs(base, sweep) for stage in RUN_METRICS}
    return sorted(files)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _column_names(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> column: the last component when unique across the sweep, else the whole key."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def run_values(evaluate: Optional[Mapping[str, Any]] = None, generator: Optional[Mapping[str, Any]] = None,
               correlation: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """A run's numbers, flat, from its metrics files: evaluate's headline metrics
    (:data:`~spectralar.evaluation.headline.HEADLINE_METRICS`, None when not run) and ``fid_drop<k>``
    (FID of the same samples decoded from N−k tokens, Table 3), the generator's ``generator_val_loss``
    and ``generator_val_accuracy`` (next-token accuracy), and Table 1's ``r2_<paradigm>_<t2|t3|t4|average>``.
    The report computes the same names for its own pipeline, so a run of a sweep and the main
    pipeline compare column by column."""
    evaluate = evaluate or {}
    values: dict[str, Any] = {name: evaluate.get(name) for name in HEADLINE_METRICS}
    for dropped, fid in sorted((evaluate.get("fid_truncated") or {}).items(), key=lambda item: int(item[0])):
        if int(dropped):
            values[f"fid_drop{int(dropped)}"] = fid
    if generator:
        values.update({f"generator_{name}": generator.get(name) for name in GENERATOR_METRICS})
    for paradigm, table in (correlation or {}).items():
        if isinstance(table, Mapping) and "average" in table:  # raster, scale, spectral (not paper_table1)
            values.update({f"r2_{paradigm}_{key.removeprefix('r2_')}": value for key, value in table.items()})
    return values


def table_rows(rows: Mapping[str, Mapping[str, Any]], metrics: Mapping[Key, Optional[Mapping[str, Any]]], *,
               seeds: Optional[Sequence[int]] = None, run_seed: Optional[int] = None,
               generator: Optional[Mapping[Key, Optional[Mapping[str, Any]]]] = None,
               correlation: Optional[Mapping[Key, Optional[Mapping[str, Any]]]] = None) -> list[dict]:
    """One dict per run (row, then seed): ``row``, the overridden keys, ``seed``, then
    :func:`run_values` of the run's metrics. ``metrics`` (evaluate), ``generator`` and ``correlation``
    map a run (:func:`run_key`: the row, or (row, seed) when ``seeds`` is given) to that metrics file's
    contents, or None when it was not run. A sweep without seeds ran at ``run_seed``."""
    keys: list[str] = []
    for overrides in rows.values():
        keys += [k for k in overrides if k not in keys]
    columns = _column_names(keys)
    lines = []
    for row, overrides in rows.items():
        for seed in (seeds if seeds is not None else [None]):
            key = run_key(row, seed)
            line: dict[str, Any] = {"row": row}
            line.update({columns[k]: overrides.get(k) for k in keys})
            line["seed"] = seed if seed is not None else run_seed
            line.update(run_values(metrics.get(key), (generator or {}).get(key), (correlation or {}).get(key)))
            lines.append(line)
    names: list[str] = []
    for line in lines:  # one header for all: a run that has not run leaves its columns empty
        names += [name for name in line if name not in names]
    return [{name: line.get(name) for name in names} for line in lines]


def write_table(path: str | Path, table: Sequence[Mapping[str, Any]]) -> None:
    from spectralar.io import csv_text, write_text

    write_text(path, csv_text(list(table)))


def read_table(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_from_files(params_file: str | Path, sweep: str, dvc_yaml: str | Path = "dvc.yaml") -> list[dict]:
    """A sweep's table from its runs' metrics files (a run's own, its seed's, or the main ones it reuses)."""
    from spectralar.io import read_json

    base = read_yaml(params_file)
    dag = load_dag(dvc_yaml)
    rows, seeds = sweep_definition(base, sweep)
    found: dict[str, dict[Key, Optional[dict]]] = {stage: {} for stage in RUN_METRICS}
    for row, seed in sweep_runs(base, sweep):
        plan = RowPlan(dag, base, sweep, row, seed)
        for stage in RUN_METRICS:
            path = Path(plan.metrics_file(stage))
            found[stage][run_key(row, seed)] = read_json(path) if path.is_file() else None
    return table_rows(rows, found["evaluate"], seeds=seeds, run_seed=base["run"]["seed"],
                      generator=found["train_generator"], correlation=found["correlation"])


# --------------------------------------------------------------------------------------------
# DVC experiments
# --------------------------------------------------------------------------------------------

def experiment_name(sweep: str, row: str, seed: Optional[int] = None) -> str:
    return f"{sweep}-{row}" + ("" if seed is None else f"-seed{seed}")


def experiment_commands(params_file: str | Path, sweep: str, how: str = "--queue") -> list[list[str]]:
    """``dvc exp run <how> -n <name> -S key=value ...`` for every run (with ``-S run.seed=k`` when the
    sweep has seeds; DVC's run cache then shares seed k's row-independent stages between rows). ``how``:
    ``--queue`` (into DVC's queue) or ``--temp`` (run now, in a temporary copy of the workspace)."""
    if how not in ("--queue", "--temp"):
        raise ValueError(f"how: --queue or --temp, got {how!r}")
    base = read_yaml(params_file)
    rows = sweep_rows(base, sweep)
    schedule = sweep_schedule(base, sweep)
    commands = []
    for row, seed in sweep_runs(base, sweep):
        command = ["dvc", "exp", "run", how, "-n", experiment_name(sweep, row, seed)]
        for key, value in {**schedule, **rows[row]}.items():
            command += ["-S", f"{key}={json.dumps(value)}"]
        if seed is not None:
            command += ["-S", f"{SEED_KEY}={seed}"]
        commands.append(command)
    return commands


def _experiments(show: Any) -> Iterable[dict]:
    """Every experiment record in ``dvc exp show --json`` output (DVC 3: baselines with nested runs)."""
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield rev


def metrics_from_experiments(show: Any, sweep: str, rows: Iterable[str],
                             metrics_file: str = "metrics/evaluate.json",
                             seeds: Optional[Sequence[int]] = None) -> dict[Key, Optional[dict]]:
    """Each run's metrics file from the experiment named :func:`experiment_name` (None if absent),
    keyed by :func:`run_key`."""
    runs = [(row, seed) for row in rows for seed in (seeds if seeds is not None else [None])]
    found: dict[Key, Optional[dict]] = {run_key(*run): None for run in runs}
    names = {experiment_name(sweep, *run): run_key(*run) for run in runs}
    for record in _experiments(show):
        key = names.get(record.get("name"))
        if key is None or found[key] is not None:
            continue
        data = (record.get("data") or {}).get("metrics", {}).get(metrics_file, {}).get("data")
        if data:
            found[key] = data
    return found


def collect(params_file: str | Path, sweep: str) -> list[dict]:
    result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SweepError(f"dvc exp show failed: {result.stderr.strip()}")
    return table_from_experiments(read_yaml(params_file), sweep, json.loads(result.stdout))


def table_from_experiments(base: Mapping[str, Any], sweep: str, show: Any) -> list[dict]:
    """A sweep's table from ``dvc exp show --json`` output: the same lines as :func:`table_from_files`."""
    rows, seeds = sweep_definition(base, sweep)
    found = {stage: metrics_from_experiments(show, sweep, rows, f"metrics/{stage}.json", seeds) for stage in RUN_METRICS}
    return table_rows(rows, found["evaluate"], seeds=seeds, run_seed=base["run"]["seed"],
                      generator=found["train_generator"], correlation=found["correlation"])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    from spectralar.io import ArtifactError  # imports numpy, which the Snakefile's imports of this module skip

    parser = argparse.ArgumentParser(prog="python -m spectralar.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=PARAMS_FILE)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("params", help="write one run's params file (Snakemake calls this)")
    p.add_argument("sweep")
    p.add_argument("row", nargs="?", help="omitted: the params of --seed alone (the stages a seed's rows share)")
    p.add_argument("--seed", type=int, help="the run.seed of this run (a sweep with seeds)")
    p.add_argument("--out")
    t = sub.add_parser("table", help="runs/<sweep>/table.csv from the rows' metrics files (Snakemake)")
    t.add_argument("sweep")
    t.add_argument("--out")
    r = sub.add_parser("run", help="run one `dvc exp run --temp` per run (row, or row x seed), one after another")
    q = sub.add_parser("queue", help="queue one `dvc exp run --queue` per run, for `dvc queue start`")
    for runs in (r, q):
        runs.add_argument("sweep")
        runs.add_argument("--dry-run", action="store_true", help="print the commands only")
    c = sub.add_parser("collect", help="runs/<sweep>/table.csv from the DVC experiments <sweep>-<row>[-seed<k>]")
    c.add_argument("sweep")
    c.add_argument("--out")
    args = parser.parse_args(argv)
    try:
        if args.what == "params":
            print(write_row_params(args.params, args.sweep, args.row, args.out, seed=args.seed))
        elif args.what in ("run", "queue"):
            for command in experiment_commands(args.params, args.sweep, "--temp" if args.what == "run" else "--queue"):
                print(shlex.join(command))
                if not args.dry_run:
                    subprocess.run(command, check=True)
        else:
            table = (table_from_files(args.params, args.sweep) if args.what == "table"
                     else collect(args.params, args.sweep))
            out = args.out or f"{SWEEP_ROOT}/{args.sweep}/table.csv"
            write_table(out, table)
            print(out)
    except (SweepError, ConfigError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
