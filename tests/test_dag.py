"""The DAG from dvc.yaml, and how its deps and outs become Snakemake's named inputs and outputs."""

from __future__ import annotations

import pytest

from spectralar.dag import (
    CODE,
    REPORT_OUTPUTS,
    code_files,
    command_paths,
    final_outputs,
    is_directory,
    load_dag,
    producer,
    report_entry,
    stage_inputs,
    stage_outputs,
    topological_order,
)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def dag():
    return load_dag(REPO / "dvc.yaml")


def test_command_paths_are_the_flags_values():
    paths = command_paths("python -m spectralar report --params params.yaml --metrics-dir metrics --verbose --out reports")
    assert paths == {"params": "params.yaml", "metrics_dir": "metrics", "out": "reports"}


def test_a_file_inside_a_directory_output_is_that_directory(dag):
    assert producer(dag, "models/proxy/proxy.pt") == ("train_proxy", "models/proxy")
    assert producer(dag, "spectralar/data") is None
    inputs = stage_inputs(dag, "train_tokenizer", REPO)
    assert inputs["proxy"] == ["models/proxy"] and inputs["codes"] == ["data/proxy_codes"]
    assert inputs["data"] == ["data/prepared"]
    assert all(path.startswith("spectralar/") for path in inputs[CODE])


def test_every_dep_and_out_gets_exactly_one_name(dag):
    for name, spec in dag.items():
        inputs = [p for paths in stage_inputs(dag, name, REPO).values() for p in paths]
        made = {producer(dag, d)[1] for d in spec.deps if producer(dag, d) is not None}
        code = {path for d in spec.deps if producer(dag, d) is None for path in code_files(d, REPO)}
        assert sorted(inputs) == sorted(made | code), name
        outputs = [p for paths in stage_outputs(dag, name).values() for p in paths]
        assert sorted(outputs) == sorted(spec.outs), name
        assert stage_outputs(dag, name)["metrics"] == list(spec.metrics) == [f"metrics/{name}.json"], name


def test_the_closest_flag_names_a_path(dag):
    """``--metrics metrics/report.json`` beats ``--metrics-dir metrics``; ``--out reports`` passes its files."""
    outputs = stage_outputs(dag, "report")
    assert outputs["metrics"] == ["metrics/report.json"]
    assert "reports/report.md" in outputs["out"] and "reports/figures" in outputs["out"]
    inputs = stage_inputs(dag, "report", REPO)
    assert "metrics/evaluate.json" in inputs["metrics_dir"] and inputs["correlation"] == ["reports/correlation"]


def test_order_directories_and_final_outputs(dag):
    order = topological_order(dag)
    for name in dag:
        for dep in dag[name].deps:
            made_by = producer(dag, dep)
            assert made_by is None or order.index(made_by[0]) < order.index(name), (name, dep)
    assert is_directory("data/prepared") and is_directory("reports/figures") and not is_directory("reports/report.md")
    assert final_outputs(dag) == [f"metrics/{name}.json" for name in dag]


def test_report_outputs_are_stage_outputs_with_a_caption(dag):
    """Every output marked for `snakemake --report` is a dvc.yaml out (a renamed out would silently
    drop from the report otherwise), has its caption file, and a directory names the files it shows."""
    outs = {out for spec in dag.values() for out in spec.outs}
    assert set(REPORT_OUTPUTS) <= outs
    for path, entry in REPORT_OUTPUTS.items():
        assert (REPO / entry.caption).is_file(), path
        assert bool(entry.patterns) == is_directory(path), path
        assert all("{name}" in pattern for pattern in entry.patterns), path  # Snakemake globs by wildcard
    categories = {entry.category for entry in REPORT_OUTPUTS.values()}
    assert {"Samples", "Tokenizer", "Evaluation", "Ablation"} <= categories
    assert report_entry("samples").category == "Samples" and report_entry("models/tokenizer/tokenizer.pt") is None
    assert report_entry("reports/ablation.csv").category == "Ablation"


def test_a_code_directory_is_its_files_without_the_bytecode_cache(tmp_path):
    """Snakemake judges a directory input by the directory's mtime, which an in-place edit of a module
    does not change, and which the bytecode cache a first import writes does: so a code directory is
    given as its files, the cache left out."""
    package = tmp_path / "spectralar" / "models"
    (package / "__pycache__").mkdir(parents=True)
    (package / "sub" / "__pycache__").mkdir(parents=True)
    for name in ("generator.py", "__init__.py", "__pycache__/generator.cpython-311.pyc", "sub/blocks.py",
                 "sub/__pycache__/blocks.cpython-311.pyc", "sub/table.json", "stale.pyc"):
        (package / name).write_text("")
    assert code_files("spectralar/models", tmp_path) == [
        "spectralar/models/__init__.py", "spectralar/models/generator.py", "spectralar/models/sub/blocks.py",
        "spectralar/models/sub/table.json"]
    assert code_files("spectralar/models/generator.py", tmp_path) == ["spectralar/models/generator.py"]
    dag = load_dag(REPO / "dvc.yaml")
    code = stage_inputs(dag, "train_generator", REPO)[CODE]
    assert "spectralar/models/generator.py" in code and "spectralar/models" not in code
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in code)
