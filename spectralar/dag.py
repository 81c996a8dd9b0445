"""The pipeline's DAG, read from ``dvc.yaml``: the one declaration of every stage's command, deps,
outs and params sections.

DVC runs ``dvc.yaml`` as it is. Snakemake generates one rule per stage from it
(``workflow/rules/stages.smk``, with :func:`stage_inputs` and :func:`stage_outputs` naming the files
after the command-line flags that pass them), and the sweep rules re-path it per row
(``spectralar.sweep.RowPlan``). So adding a stage never touches the Snakemake files.

Which outputs are results a person looks at is declared here too (:data:`REPORT_OUTPUTS`): the
generated rules mark them for ``snakemake --report`` with a caption from ``workflow/report/``.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import yaml

# Names of the Snakemake inputs/outputs that no command-line flag passes.
CODE = "code"           # deps no stage produces: the package's own code
UPSTREAM = "upstream"   # deps another stage produces, read from a path the command does not pass
OUTS = "outs"           # outs the command does not pass

# Python's bytecode cache, which is not code: the first import of a package writes <package>/__pycache__/
# (unless PYTHONDONTWRITEBYTECODE is set), so a stage that imports a package another stage lists as a
# dep would change that dep. .dvcignore keeps it out of DVC's hashes; :func:`code_files` out of Snakemake's inputs.
BYTECODE_DIR, BYTECODE_SUFFIXES = "__pycache__", (".pyc", ".pyo")


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs + metrics + plots
    sections: tuple[str, ...]
    metrics: tuple[str, ...] = ()  # the metrics files among outs


def _paths(entries: Iterable) -> list[str]:
    """dvc.yaml out entries are a path or ``{path: {cache: false, ...}}``."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def load_dag(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, StageSpec]:
    """The stages of ``dvc.yaml`` in file order (top-level ``plots:`` are for ``dvc plots`` only)."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    dag = {}
    for name, stage in spec.items():
        metrics = _paths(stage.get("metrics", []))
        outs = _paths(stage.get("outs", [])) + metrics + _paths(stage.get("plots", []))
        dag[name] = StageSpec(name, stage["cmd"], tuple(stage.get("deps", [])), tuple(outs),
                              tuple(stage.get("params", [])), tuple(metrics))
    return dag


def _inside(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def producer(dag: Mapping[str, StageSpec], path: str) -> Optional[tuple[str, str]]:
    """(stage, out) of the stage output that ``path`` is or lies inside, or None (source code, params)."""
    for spec in dag.values():
        for out in spec.outs:
            if _inside(path, out):
                return spec.name, out
    return None


def upstream(dag: Mapping[str, StageSpec], stage: str) -> set[str]:
    found = {p[0] for p in (producer(dag, d) for d in dag[stage].deps) if p is not None}
    return found - {stage}


def topological_order(dag: Mapping[str, StageSpec]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for parent in sorted(upstream(dag, name)):
            visit(parent)
        order.append(name)

    for name in dag:
        visit(name)
    return order


def is_directory(path: str) -> bool:
    """dvc.yaml does not say which outs are directories; in this pipeline they are the paths without
    a file suffix (``data/prepared``, ``reports/figures``), files all have one (``.json``, ``.md``)."""
    return not Path(path).suffix


# --------------------------------------------------------------------------------------------
# Snakemake's view of a stage: named inputs and outputs
# --------------------------------------------------------------------------------------------

def command_paths(cmd: str) -> dict[str, str]:
    """The ``--flag value`` pairs of a command line, keyed by the flag as a Python name
    (``--metrics-dir metrics`` -> ``{"metrics_dir": "metrics"}``)."""
    words = shlex.split(cmd)
    found = {}
    for flag, value in zip(words, words[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            name = flag[2:].replace("-", "_")
            if not name.isidentifier():
                raise ValueError(f"{cmd!r}: flag {flag} is not usable as a Snakemake input/output name")
            found.setdefault(name, value)
    return found


def _passed_by(path: str, arguments: Mapping[str, str]) -> Optional[str]:
    """The flag whose value is ``path`` or the closest directory above it (``--out reports`` passes
    ``reports/report.md``; ``--metrics metrics/report.json`` beats ``--metrics-dir metrics``)."""
    candidates = [(len(value), name) for name, value in arguments.items() if _inside(path, value)]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _group(named: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, path in named:
        if path not in groups.setdefault(name, []):
            groups[name].append(path)
    return groups


def code_files(path: str, root: str | Path = ".") -> list[str]:
    """A dep no stage produces (the package's code), as Snakemake inputs: a file as itself; a directory
    (``spectralar/models``) as every file inside it, sorted, the bytecode cache left out. Snakemake
    judges a directory input by the directory's own mtime, which an edit of a module inside it does not
    change (DVC hashes the directory's contents). Paths are relative to ``root``, the project."""
    folder = Path(root) / path
    if not folder.is_dir():
        return [path]
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if d != BYTECODE_DIR)
        relative = Path(path) / Path(directory).relative_to(folder)
        files += [(relative / name).as_posix() for name in names if not name.endswith(BYTECODE_SUFFIXES)]
    return sorted(files)


def stage_inputs(dag: Mapping[str, StageSpec], stage: str, root: str | Path = ".") -> dict[str, list[str]]:
    """The stage's deps as Snakemake inputs, named after the flag that passes each in its command
    (``--data data/prepared`` -> ``data``); deps no stage produces go under :data:`CODE`, a directory
    as its files (:func:`code_files`, relative to the project ``root``). A dep inside another stage's
    directory output becomes that directory (``models/proxy/proxy.pt`` -> ``models/proxy``):
    Snakemake matches a rule's outputs, not files inside them."""
    arguments = command_paths(dag[stage].cmd)
    named = []
    for dep in dag[stage].deps:
        made_by = producer(dag, dep)
        if made_by is None:
            name = _passed_by(dep, arguments) or CODE
            named += [(name, path) for path in code_files(dep, root)]
        else:
            named.append((_passed_by(dep, arguments) or UPSTREAM, made_by[1]))
    return _group(named)


def stage_outputs(dag: Mapping[str, StageSpec], stage: str) -> dict[str, list[str]]:
    """The stage's outs and metrics as Snakemake outputs, named after the flag that passes each
    (``--metrics`` -> ``metrics``, ``--out`` -> ``out``); any other out goes under :data:`OUTS`."""
    arguments = command_paths(dag[stage].cmd)
    return _group((_passed_by(out, arguments) or OUTS, out) for out in dag[stage].outs)


def final_outputs(dag: Mapping[str, StageSpec]) -> list[str]:
    """What a full run makes: every stage's metrics files (its outs when it declares none)."""
    return [path for spec in dag.values() for path in (spec.metrics or spec.outs)]


# --------------------------------------------------------------------------------------------
# snakemake --report: which outputs are results, and how the report files them
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportEntry:
    """How ``snakemake --report`` shows one stage output: its category in the report's results
    section, its caption (reStructuredText, rendered with Jinja: ``snakemake.wildcards.name`` is the
    file of a directory), and for a directory the files of it that are shown (Snakemake's
    ``patterns``: each needs a wildcard, ``{name}``)."""

    category: str
    caption: str  # path from the repository root
    patterns: tuple[str, ...] = ()
    subcategory: Union[None, str, Callable] = None  # or a function of the pattern's wildcards

    def labels(self) -> dict[str, str]:
        """The report's table columns: the file shown, without its suffix."""
        return {"figure": "{name}"} if self.patterns else {}


def sample_figure_group(wildcards) -> str:
    """The per-class grids (grid_<index>_<class>.png) under their own heading, apart from the overview."""
    return "Per class" if wildcards.name.startswith("grid_") else "Overview"


REPORT_DIR = "workflow/report"
REPORT_OUTPUTS: dict[str, ReportEntry] = {
    "samples": ReportEntry("Samples", f"{REPORT_DIR}/samples.rst", ("{name}.png", "{name}.gif"),
                           subcategory=sample_figure_group),
    "models/tokenizer": ReportEntry("Tokenizer", f"{REPORT_DIR}/tokenizer.rst", ("{name}.png",)),
    "reports/figures": ReportEntry("Training", f"{REPORT_DIR}/training.rst", ("{name}_curves.png",)),
    "reports/correlation": ReportEntry("Evaluation", f"{REPORT_DIR}/correlation.rst", ("{name}.png",),
                                       subcategory="Token correlation (Table 1, Figure 4)"),
    "reports/evaluate": ReportEntry("Evaluation", f"{REPORT_DIR}/evaluate.rst", ("{name}.csv",),
                                    subcategory="Generation and reconstruction (Tables 2, 3)"),
    "reports/correlation.csv": ReportEntry("Evaluation", f"{REPORT_DIR}/correlation_table.rst",
                                           subcategory="Token correlation (Table 1, Figure 4)"),
    "reports/truncation.csv": ReportEntry("Evaluation", f"{REPORT_DIR}/truncation.rst",
                                          subcategory="Generation and reconstruction (Tables 2, 3)"),
    "reports/ablation.csv": ReportEntry("Ablation", f"{REPORT_DIR}/ablation.rst"),
}


def report_entry(path: str) -> Optional[ReportEntry]:
    """The report entry of a stage output, or None when the report does not show it."""
    return REPORT_OUTPUTS.get(path)
