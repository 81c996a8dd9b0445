"""Parameter sweeps: the paper's Table 4 ablation and any other, in both orchestrators.

params.yaml's ``sweeps`` section maps a sweep name to its rows; a row is a mapping of dotted params
keys to values, i.e. exactly the ``-S key=value`` overrides of ``dvc exp run``::

    sweeps:
      ablation:                                   # Table 4
        baseline: {tokenizer.spectral_supervision: false, tokenizer.causal_mask: false, ...}
        ...

Snakemake (``snakemake ablation``, ``snakemake runs/<sweep>/table.csv``) runs each row under
``runs/<sweep>/<row>/`` with that row's params file. Like DVC's run cache, a row reuses the main
pipeline's output of every stage whose params sections (and upstream stages) the row leaves
unchanged: a generator-depth sweep retrains no tokenizer. The DAG, the stages' params sections and
their command lines are read from ``dvc.yaml``, the one description both orchestrators are held to
(tests/test_orchestration.py), so this module never restates the pipeline.

DVC: ``python -m spectralar.sweep queue ablation`` queues one ``dvc exp run --queue -n <sweep>-<row>
-S ...`` per row; after ``dvc queue start``, ``python -m spectralar.sweep collect ablation`` reads the
experiments' metrics (``dvc exp show --json``) into the same ``runs/<sweep>/table.csv``.

``table`` writes ``runs/<sweep>/table.csv``: one line per row with the overridden keys and the
row's evaluate metrics; the report stage puts it beside the paper's numbers.
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
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from spectralar.config import ConfigError
from spectralar.dag import StageSpec, load_dag, producer, topological_order, upstream  # noqa: F401 (re-exported)
from spectralar.evaluation.headline import HEADLINE_METRICS

SWEEP_ROOT = "runs"
PARAMS_FILE = "params.yaml"
NOT_SWEPT = ("prepare", "report")  # shared by every row; a row that changes them is an error
# Sweep and row names become folders (runs/<sweep>/<row>/) and DVC experiment names: no "/" or ".."
NAME = re.compile(r"[A-Za-z0-9_-]+")


class SweepError(ValueError):
    """A sweep or row that does not exist, or an override that does not fit params.yaml."""


# --------------------------------------------------------------------------------------------
# Rows and their params
# --------------------------------------------------------------------------------------------

def sweep_rows(params: Mapping[str, Any], sweep: str) -> dict[str, dict[str, Any]]:
    """The rows of ``sweeps.<sweep>``; a sweep or row name that is not a plain folder name is refused,
    since it becomes the path ``runs/<sweep>/<row>/`` (``../../x`` would write outside the project)."""
    sweeps = params.get("sweeps") or {}
    if sweep not in sweeps:
        raise SweepError(f"sweeps.{sweep}: no such sweep in params (sweeps: {', '.join(sorted(sweeps)) or 'none'})")
    for where, name in [(f"sweeps.{sweep}", sweep)] + [(f"sweeps.{sweep}.{row}", row) for row in sweeps[sweep]]:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}: name {name!r} may only hold letters, digits, '_' and '-' "
                              f"(it names the folder {SWEEP_ROOT}/<sweep>/<row>/ and the DVC experiment <sweep>-<row>)")
    return dict(sweeps[sweep])


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


def row_dir(sweep: str, row: str) -> str:
    return f"{SWEEP_ROOT}/{sweep}/{row}"


def row_params_path(sweep: str, row: str) -> str:
    return f"{row_dir(sweep, row)}/{PARAMS_FILE}"


def write_row_params(params_file: str | Path, sweep: str, row: str, out: Optional[str | Path] = None) -> Path:
    """Write a row's complete params file (validated by the strict loader) and return its path."""
    from spectralar.config import load_params
    from spectralar.io import write_text

    base = yaml.safe_load(Path(params_file).read_text())
    rows = sweep_rows(base, sweep)
    if row not in rows:
        raise SweepError(f"sweeps.{sweep}.{row}: no such row (rows: {', '.join(rows)})")
    params = apply_overrides(base, rows[row], f"sweeps.{sweep}.{row}")
    params["sweeps"] = {}  # a row sweeps nothing; and editing another row leaves this file unchanged
    out = Path(out or row_params_path(sweep, row))
    header = f"# {sweep}/{row}: {params_file} with {json.dumps(rows[row])} (written by spectralar.sweep)\n"
    write_text(out, header + yaml.safe_dump(params, sort_keys=False))
    load_params(out)  # a bad value fails here, with its key path, before any stage runs
    return out


# --------------------------------------------------------------------------------------------
# Which stages a row reruns (the DAG itself: spectralar.dag)
# --------------------------------------------------------------------------------------------

def row_specific_stages(dag: Mapping[str, StageSpec], base: Mapping[str, Any],
                        row: Mapping[str, Any]) -> set[str]:
    """Stages whose params sections differ between ``row`` and ``base``, and everything downstream."""
    changed: set[str] = set()
    for name in topological_order(dag):
        own = any(base.get(s) != row.get(s) for s in dag[name].sections)
        if own or upstream(dag, name) & changed:
            changed.add(name)
    return changed


# --------------------------------------------------------------------------------------------
# One row's plan: which stages it runs, with which paths
# --------------------------------------------------------------------------------------------

class RowPlan:
    """Paths and commands of one sweep row: row-specific stages live under ``runs/<sweep>/<row>/``."""

    def __init__(self, dag: Mapping[str, StageSpec], base: Mapping[str, Any], sweep: str, row: str) -> None:
        rows = sweep_rows(base, sweep)
        if row not in rows:
            raise SweepError(f"sweeps.{sweep}.{row}: no such row (rows: {', '.join(rows)})")
        self.dag, self.sweep, self.row = dag, sweep, row
        self.params = apply_overrides(base, rows[row], f"sweeps.{sweep}.{row}")
        self.specific = row_specific_stages(dag, base, self.params)
        shared = sorted(self.specific & set(NOT_SWEPT) - {"report"})
        if shared:
            raise SweepError(f"sweeps.{sweep}.{row}: changes the params of {', '.join(shared)}, which every row "
                             f"shares; sweep such sections with `dvc exp run -S` instead")
        self.specific.discard("report")
        self.prefix = row_dir(sweep, row)

    def path(self, path: str) -> str:
        """Where ``path`` (a stage output, or a file inside one) lives for this row."""
        made_by = producer(self.dag, path)
        if made_by is not None and made_by[0] in self.specific:
            return f"{self.prefix}/{path}"
        return path

    def input_path(self, path: str) -> str:
        """Like :meth:`path`, but a file inside a stage's directory output becomes that directory
        (Snakemake matches a rule's outputs, not files inside them)."""
        made_by = producer(self.dag, path)
        return self.path(made_by[1]) if made_by is not None else path

    def inputs(self, stage: str) -> list[str]:
        return sorted({self.input_path(d) for d in self.dag[stage].deps})

    def sections(self, stage: str) -> dict[str, Any]:
        """The row's values of the params sections ``stage`` reads (a change reruns it)."""
        return {name: self.params[name] for name in self.dag[stage].sections}

    def command(self, stage: str) -> str:
        """dvc.yaml's command with this row's params file and paths; private paths (checkpoints) move too."""
        if stage not in self.specific:
            raise SweepError(f"{self.sweep}/{self.row} reuses the main pipeline's {stage}; nothing to run")
        words = shlex.split(self.dag[stage].cmd)
        for i in range(1, len(words)):
            if not words[i - 1].startswith("--") or words[i].startswith("--"):
                continue
            if words[i - 1] == "--params":
                words[i] = row_params_path(self.sweep, self.row)
            elif producer(self.dag, words[i]) is not None:
                words[i] = self.path(words[i])
            else:  # a path of the stage's own that no stage declares (e.g. --checkpoints)
                words[i] = f"{self.prefix}/{words[i]}"
        return shlex.join(words)

    def metrics_file(self, stage: str) -> str:
        return self.path(f"metrics/{stage}.json")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _column_names(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> column: the last component when unique across the sweep, else the whole key."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def table_rows(rows: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, Optional[Mapping[str, Any]]]) -> list[dict]:
    """One dict per row: ``row``, the overridden keys, then the headline metrics of the row's
    metrics/evaluate.json (:data:`~spectralar.evaluation.headline.HEADLINE_METRICS`; None when not run)."""
    keys: list[str] = []
    for overrides in rows.values():
        keys += [k for k in overrides if k not in keys]
    columns = _column_names(keys)
    table = []
    for row, overrides in rows.items():
        line: dict[str, Any] = {"row": row}
        line.update({columns[k]: overrides.get(k) for k in keys})
        found = metrics.get(row)
        line.update({m: (found or {}).get(m) for m in HEADLINE_METRICS})
        table.append(line)
    return table


def write_table(path: str | Path, table: Sequence[Mapping[str, Any]]) -> None:
    from spectralar.io import csv_text, write_text

    write_text(path, csv_text(list(table)))


def read_table(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_from_files(params_file: str | Path, sweep: str, dvc_yaml: str | Path = "dvc.yaml") -> list[dict]:
    """A sweep's table from the rows' metrics/evaluate.json (a row's own, or the main one it reuses)."""
    from spectralar.io import read_json

    base = yaml.safe_load(Path(params_file).read_text())
    dag = load_dag(dvc_yaml)
    rows = sweep_rows(base, sweep)
    metrics = {}
    for row in rows:
        path = Path(RowPlan(dag, base, sweep, row).metrics_file("evaluate"))
        metrics[row] = read_json(path) if path.is_file() else None
    return table_rows(rows, metrics)


# --------------------------------------------------------------------------------------------
# DVC experiments
# --------------------------------------------------------------------------------------------

def experiment_name(sweep: str, row: str) -> str:
    return f"{sweep}-{row}"


def queue_commands(params_file: str | Path, sweep: str) -> list[list[str]]:
    """``dvc exp run --queue -n <sweep>-<row> -S key=value ...`` for every row."""
    rows = sweep_rows(yaml.safe_load(Path(params_file).read_text()), sweep)
    commands = []
    for row, overrides in rows.items():
        command = ["dvc", "exp", "run", "--queue", "-n", experiment_name(sweep, row)]
        for key, value in overrides.items():
            command += ["-S", f"{key}={json.dumps(value)}"]
        commands.append(command)
    return commands


def _experiments(show: Any) -> Iterable[dict]:
    """Every experiment record in ``dvc exp show --json`` output (DVC 3: baselines with nested runs)."""
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield rev


def metrics_from_experiments(show: Any, sweep: str, rows: Iterable[str],
                             metrics_file: str = "metrics/evaluate.json") -> dict[str, Optional[dict]]:
    """Each row's evaluate metrics from the experiment named ``<sweep>-<row>`` (None if absent)."""
    found: dict[str, Optional[dict]] = {row: None for row in rows}
    names = {experiment_name(sweep, row): row for row in found}
    for record in _experiments(show):
        row = names.get(record.get("name"))
        if row is None or found[row] is not None:
            continue
        data = (record.get("data") or {}).get("metrics", {}).get(metrics_file, {}).get("data")
        if data:
            found[row] = data
    return found


def collect(params_file: str | Path, sweep: str) -> list[dict]:
    result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SweepError(f"dvc exp show failed: {result.stderr.strip()}")
    rows = sweep_rows(yaml.safe_load(Path(params_file).read_text()), sweep)
    return table_rows(rows, metrics_from_experiments(json.loads(result.stdout), sweep, rows))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    from spectralar.io import ArtifactError  # imports numpy, which the Snakefile's imports of this module skip

    parser = argparse.ArgumentParser(prog="python -m spectralar.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=PARAMS_FILE)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("params", help="write one row's params file (Snakemake calls this)")
    p.add_argument("sweep")
    p.add_argument("row")
    p.add_argument("--out")
    t = sub.add_parser("table", help="runs/<sweep>/table.csv from the rows' metrics files (Snakemake)")
    t.add_argument("sweep")
    t.add_argument("--out")
    q = sub.add_parser("queue", help="queue one `dvc exp run` per row")
    q.add_argument("sweep")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    c = sub.add_parser("collect", help="runs/<sweep>/table.csv from the DVC experiments <sweep>-<row>")
    c.add_argument("sweep")
    c.add_argument("--out")
    args = parser.parse_args(argv)
    try:
        if args.what == "params":
            print(write_row_params(args.params, args.sweep, args.row, args.out))
        elif args.what == "queue":
            for command in queue_commands(args.params, args.sweep):
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
