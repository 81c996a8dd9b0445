"""Sweeps: rows as params overrides, which stages a row reruns, commands, tables, DVC experiment records."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from spectralar.config import load_params
from spectralar.sweep import (
    RowPlan,
    SweepError,
    apply_overrides,
    load_dag,
    metrics_from_experiments,
    queue_commands,
    read_table,
    row_specific_stages,
    table_rows,
    write_row_params,
    write_table,
)
from tests.conftest import REPO, default_params, write_params

DOWNSTREAM_OF_TOKENIZER = {"extract_proxy_codes", "train_tokenizer", "dump_tokens", "train_generator", "sample",
                           "evaluate"}


@pytest.fixture(scope="module")
def dag():
    return load_dag(REPO / "dvc.yaml")


def test_the_dag_comes_from_dvc_yaml(dag):
    from spectralar.stages import STAGES

    assert sorted(dag) == sorted(STAGES)
    assert dag["train_generator"].sections == ("run", "generator", "train_generator")
    from spectralar.sweep import upstream

    assert upstream(dag, "sample") == {"train_generator", "train_tokenizer", "prepare"}
    assert upstream(dag, "prepare") == set()


def test_table4_rows_rerun_everything_from_the_tokenizer_on(dag):
    base = default_params()
    rows = base["sweeps"]["ablation"]
    assert list(rows) == ["baseline", "spectral", "causal", "nonuniform"]
    switches = [tuple(r[f"tokenizer.{s}"] for s in ("spectral_supervision", "causal_mask", "nonuniform_mapping"))
                for r in rows.values()]
    assert switches == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    for row in ("baseline", "spectral", "causal"):
        assert row_specific_stages(dag, base, apply_overrides(base, rows[row])) == DOWNSTREAM_OF_TOKENIZER | {"report"}
    # the last row is params.yaml itself: it reuses the main pipeline, nothing to run
    assert RowPlan(dag, base, "ablation", "nonuniform").specific == set()


def test_a_generator_sweep_reuses_the_main_tokenizer(dag):
    plan = RowPlan(dag, default_params(), "depth", "d2")
    assert plan.specific == {"train_generator", "sample", "evaluate"}
    command = shlex.split(plan.command("train_generator"))
    assert command[command.index("--params") + 1] == "runs/depth/d2/params.yaml"
    assert command[command.index("--tokens") + 1] == "data/tokens"  # the main pipeline's token dump
    assert command[command.index("--out") + 1] == "runs/depth/d2/models/generator"
    assert command[command.index("--checkpoints") + 1].startswith("runs/depth/d2/")
    sample = shlex.split(plan.command("sample"))
    assert sample[sample.index("--tokenizer") + 1] == "models/tokenizer/tokenizer.pt"
    assert sample[sample.index("--generator") + 1] == "runs/depth/d2/models/generator/generator.pt"
    # Snakemake inputs name directory outputs, never files inside them
    assert "models/tokenizer" in plan.inputs("sample") and "runs/depth/d2/models/generator" in plan.inputs("sample")
    assert plan.metrics_file("evaluate") == "runs/depth/d2/metrics/evaluate.json"
    assert plan.metrics_file("train_tokenizer") == "metrics/train_tokenizer.json"
    with pytest.raises(SweepError, match="reuses the main pipeline's dump_tokens"):
        plan.command("dump_tokens")


def test_row_commands_equal_dvc_commands_but_for_paths(dag):
    plan = RowPlan(dag, default_params(), "ablation", "baseline")
    for stage in plan.specific:
        ours, theirs = shlex.split(plan.command(stage)), shlex.split(dag[stage].cmd)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a == b or a == f"runs/ablation/baseline/{b}", (stage, a, b)


def test_bad_rows_fail_clearly(tmp_path, dag):
    base = default_params()
    with pytest.raises(SweepError, match="override 'tokenizer.no_such_key' names no params key"):
        apply_overrides(base, {"tokenizer.no_such_key": 1})
    base["sweeps"]["odd"] = {"r": {"data.resolution": 64}}
    with pytest.raises(SweepError, match="changes the params of prepare"):
        RowPlan(dag, base, "odd", "r")
    with pytest.raises(SweepError, match="no such sweep"):
        RowPlan(dag, base, "nope", "r")
    params = write_params(tmp_path / "params.yaml", {"sweeps": {"bad": {"r": {"generator.depth": "deep"}}}})
    with pytest.raises(Exception, match="generator.depth: expected int"):
        write_row_params(params, "bad", "r", tmp_path / "row.yaml")


def test_row_params_file_is_complete_and_strict(tmp_path):
    out = write_row_params(REPO / "params.yaml", "ablation", "baseline", tmp_path / "row" / "params.yaml")
    params = load_params(out)
    assert params.tokenizer.causal_mask is False and params.tokenizer.spectral_supervision is False
    assert params.sweeps == {}  # editing another row leaves this file unchanged
    raw = yaml.safe_load(out.read_text())
    assert raw["generator"] == default_params()["generator"]


def test_tables_and_dvc_experiment_records(tmp_path):
    rows = default_params()["sweeps"]["ablation"]
    table = table_rows(rows, {"baseline": {"fid": 12.5, "inception_score": 3.1}, "causal": None})
    assert list(table[0])[:4] == ["row", "spectral_supervision", "causal_mask", "nonuniform_mapping"]
    assert table[0]["fid"] == 12.5 and table[2]["fid"] is None
    write_table(tmp_path / "t.csv", table)
    back = read_table(tmp_path / "t.csv")
    assert back[0]["spectral_supervision"] == "false" and back[0]["fid"] == "12.5" and back[2]["fid"] == ""
    # `dvc exp show --json` (DVC 3): baselines with their experiments' revs, metrics by file
    show = [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc", "name": "main", "data": {}, "experiments": [
                {"revs": [{"rev": "e1", "name": "ablation-causal",
                           "data": {"metrics": {"metrics/evaluate.json": {"data": {"fid": 7.0}}}}}]},
                {"revs": [{"rev": "e2", "name": "other-causal", "data": {}}]}]}]
    found = metrics_from_experiments(show, "ablation", rows)
    assert found == {"baseline": None, "spectral": None, "causal": {"fid": 7.0}, "nonuniform": None}
    commands = queue_commands(REPO / "params.yaml", "ablation")
    assert commands[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "ablation-baseline"]
    assert "tokenizer.causal_mask=false" in commands[0]
    assert json.loads(commands[1][commands[1].index("-S") + 1].split("=")[1]) is True
