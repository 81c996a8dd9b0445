"""Sweeps: rows as params overrides, which stages a row reruns, commands, tables, DVC experiment records."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from spectralar.config import ConfigError, load_params
from spectralar.sweep import (
    SEED_FREE,
    RowPlan,
    SweepError,
    apply_overrides,
    load_dag,
    metrics_from_experiments,
    parse_run,
    producer,
    experiment_commands,
    read_table,
    row_specific_stages,
    sweep_definition,
    sweep_rows,
    sweep_runs,
    sweep_seeds,
    table_from_experiments,
    table_inputs,
    topological_order,
    table_rows,
    write_row_params,
    write_table,
)
from tests.conftest import REPO, TINY, default_params, make_fashion_dir, write_params

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
    rows = sweep_rows(base, "ablation")
    assert list(rows) == ["baseline", "spectral", "causal", "nonuniform"]
    assert sweep_seeds(base, "ablation") == [0, 1, 2] and base["run"]["seed"] == 0  # the issue: at least 3 seeds
    switches = [tuple(r[f"tokenizer.{s}"] for s in ("spectral_supervision", "causal_mask", "nonuniform_mapping"))
                for r in rows.values()]
    assert switches == [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    for row in ("baseline", "spectral", "causal"):
        assert row_specific_stages(dag, base, apply_overrides(base, rows[row])) == DOWNSTREAM_OF_TOKENIZER | {"report"}
    # the last row is params.yaml's switches; every run shares the sweep's shorter schedule, so at
    # params.yaml's seed that row's tokenizer chain is seed 0's shared run, not the main pipeline's
    schedule = base["sweeps"]["ablation"]["schedule"]
    assert set(schedule) == {"train_tokenizer.stage1_steps", "train_generator.steps",  # as the committed rows ran:
                             "train_tokenizer.cpu_bf16", "train_generator.cpu_bf16",  # float32,
                             "train_tokenizer.prefix_sampling_floor"}  # p(i) ∝ i
    plan = RowPlan(dag, base, "ablation", "nonuniform", seed=0)
    assert plan.specific == set() and plan.seed_stages == DOWNSTREAM_OF_TOKENIZER - {"extract_proxy_codes"}
    assert plan.metrics_file("evaluate") == "runs/ablation/seeds/seed0/metrics/evaluate.json"
    assert plan.path("data/prepared") == "data/prepared" and plan.level("train_proxy") == "main"
    seed0 = RowPlan(dag, base, "ablation", None, seed=0)
    assert seed0.specific == plan.seed_stages
    assert seed0.params["train_tokenizer"]["stage1_steps"] == schedule["train_tokenizer.stage1_steps"]
    assert seed0.params["train_generator"]["steps"] == schedule["train_generator.steps"]
    assert not seed0.params["train_tokenizer"]["cpu_bf16"] and not seed0.params["train_generator"]["cpu_bf16"]
    assert seed0.params["train_tokenizer"]["prefix_sampling_floor"] == 1 < base["train_tokenizer"]["prefix_sampling_floor"]


def test_a_schedule_applies_to_every_run_before_its_row(tmp_path, dag):
    base = default_params()
    base["sweeps"] = {"s": {"schedule": {"train_generator.steps": 70, "generator.depth": 2},
                            "a": {"generator.depth": 3}, "b": {}}}
    assert list(sweep_rows(base, "s")) == ["a", "b"]
    a, b = RowPlan(dag, base, "s", "a"), RowPlan(dag, base, "s", "b")
    assert a.params["train_generator"]["steps"] == 70 and a.params["generator"]["depth"] == 3  # the row wins
    assert b.params["generator"]["depth"] == 2
    assert a.specific == b.specific == {"train_generator", "sample", "evaluate"}  # nothing reuses the main generator
    commands = experiment_commands(write_params(tmp_path / "params.yaml", {"sweeps": base["sweeps"]}), "s")
    assert commands[0][-4:] == ["-S", "train_generator.steps=70", "-S", "generator.depth=3"]
    assert commands[1][-4:] == ["-S", "train_generator.steps=70", "-S", "generator.depth=2"]
    header = write_row_params(tmp_path / "params.yaml", "s", "b", tmp_path / "b.yaml").read_text().splitlines()[0]
    assert '"train_generator.steps": 70' in header
    for bad in ([1, 2], {"run.seed": 3}):
        base["sweeps"]["s"]["schedule"] = bad
        with pytest.raises(SweepError, match="sweeps.s.schedule: expected a mapping"):
            sweep_rows(base, "s")
    base["sweeps"]["s"] = {"schedule": {"generator.depth": 2}}
    with pytest.raises(SweepError, match="no rows"):
        sweep_rows(base, "s")


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
    plan = RowPlan(dag, default_params(), "ablation", "baseline", seed=0)
    assert plan.prefix == "runs/ablation/baseline/seed0"
    for stage in plan.specific:
        ours, theirs = shlex.split(plan.command(stage)), shlex.split(dag[stage].cmd)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a == b or a == f"runs/ablation/baseline/seed0/{b}", (stage, a, b)


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
    out = write_row_params(REPO / "params.yaml", "ablation", "baseline", tmp_path / "row" / "params.yaml", seed=1)
    params = load_params(out)
    assert params.tokenizer.causal_mask is False and params.tokenizer.spectral_supervision is False
    assert params.run.seed == 1
    assert params.sweeps == {}  # editing another row leaves this file unchanged
    raw = yaml.safe_load(out.read_text())
    assert raw["generator"] == default_params()["generator"]
    seed_only = load_params(write_row_params(REPO / "params.yaml", "ablation", None, tmp_path / "s.yaml", seed=2))
    assert seed_only.run.seed == 2 and seed_only.tokenizer.causal_mask is True  # params.yaml's row at seed 2


def test_tables_and_dvc_experiment_records(tmp_path):
    rows = sweep_rows(default_params(), "ablation")
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
    params = write_params(tmp_path / "params.yaml", {"sweeps": {"ablation": rows}})  # a sweep without seeds
    commands = experiment_commands(params, "ablation")
    assert commands[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "ablation-baseline"]
    assert "tokenizer.causal_mask=false" in commands[0] and not any("run.seed" in word for word in commands[0])
    assert json.loads(commands[1][commands[1].index("-S") + 1].split("=")[1]) is True
    # `sweep run`: the same runs, each run now in a temporary copy of the workspace (no queue, no worker)
    temp = experiment_commands(params, "ablation", "--temp")
    assert [c[:3] + c[4:] for c in temp] == [c[:3] + c[4:] for c in commands] and {c[3] for c in temp} == {"--temp"}
    with pytest.raises(ValueError, match="--queue or --temp"):
        experiment_commands(params, "ablation", "--run-all")


# --------------------------------------------------------------------------------------------
# Seeds: a row x seed grid
# --------------------------------------------------------------------------------------------

SEED_LEVEL = {"train_proxy", "train_evalnet", "reference_stats", "correlation"}  # Table 4 rows change none of them


def test_a_seeded_row_shares_nothing_seed_dependent_with_another_seed(dag):
    """At seed 1 a Table 4 row reruns its tokenizer chain in its own folder, reads seed 1's proxy and
    evaluation network (run once per seed, shared by that seed's rows), and reads nothing of seed 0
    but prepare's output, which no seed changes."""
    base = default_params()
    plan = RowPlan(dag, base, "ablation", "baseline", seed=1)
    assert plan.row_stages == DOWNSTREAM_OF_TOKENIZER and plan.seed_stages == SEED_LEVEL
    assert plan.params["run"]["seed"] == 1 and plan.params_file == "runs/ablation/baseline/seed1/params.yaml"
    for stage in plan.specific:
        for word in shlex.split(plan.command(stage))[3:]:
            made_by = producer(dag, word.removeprefix(plan.prefix + "/").removeprefix("runs/ablation/seeds/seed1/"))
            if made_by is not None and made_by[0] != "prepare":
                assert word.startswith((plan.prefix + "/", "runs/ablation/seeds/seed1/")), (stage, word)
    tokenizer = shlex.split(plan.command("train_tokenizer"))
    assert tokenizer[tokenizer.index("--proxy") + 1] == "runs/ablation/seeds/seed1/models/proxy/proxy.pt"
    assert tokenizer[tokenizer.index("--data") + 1] == "data/prepared"
    evaluate = shlex.split(plan.command("evaluate"))
    assert evaluate[evaluate.index("--evalnet") + 1] == "runs/ablation/seeds/seed1/models/evalnet/evalnet.pt"
    with pytest.raises(SweepError, match="reuses seed 1's shared train_proxy"):
        plan.command("train_proxy")
    shared = RowPlan.of_run(dag, base, "ablation", "seeds/seed1")
    assert (shared.row, shared.seed, shared.run_id) == (None, 1, "seeds/seed1") and SEED_LEVEL <= shared.specific
    words = shlex.split(shared.command("train_proxy"))
    assert words[words.index("--params") + 1] == "runs/ablation/seeds/seed1/params.yaml"
    # params.yaml's own row at another seed is the main pipeline at that seed: the shared folder
    assert RowPlan(dag, base, "ablation", "nonuniform", seed=2).specific == set()
    assert RowPlan(dag, base, "ablation", "nonuniform", seed=2).metrics_file("evaluate") == \
        "runs/ablation/seeds/seed2/metrics/evaluate.json"
    # at params.yaml's seed the seed-level stages are the main pipeline's
    assert RowPlan(dag, base, "ablation", "baseline", seed=0).seed_stages == set()
    inputs = table_inputs(dag, base, "ablation")
    assert "runs/ablation/seeds/seed2/metrics/correlation.json" in inputs and "metrics/correlation.json" in inputs
    assert len([i for i in inputs if i.endswith("evaluate.json")]) == 4 * 3  # every (row, seed)


def test_a_sweep_without_seeds_keeps_its_layout_and_bad_seeds_are_refused(dag, tmp_path):
    base = default_params()
    assert sweep_seeds(base, "depth") is None and sweep_runs(base, "depth") == [("d2", None), ("d4", None), ("d6", None)]
    assert RowPlan(dag, base, "depth", "d2").prefix == "runs/depth/d2"
    with pytest.raises(SweepError, match="has no `seeds` list"):
        RowPlan(dag, base, "depth", "d2", seed=1)
    with pytest.raises(SweepError, match=r"seed 5 is not one of its seeds \[0, 1, 2\]"):
        RowPlan(dag, base, "ablation", "baseline", seed=5)
    for seeds in ([], [1, 1], [0, -1], "0 1", [True]):
        base["sweeps"]["odd"] = {"seeds": seeds, "r": {"generator.depth": 2}}
        with pytest.raises(SweepError, match=r"sweeps\.odd\.seeds: expected a non-empty list of distinct integers"):
            sweep_definition(base, "odd")
    base["sweeps"]["odd"] = {"seeds": [0, 1], "r": {"run.seed": 3}}
    with pytest.raises(SweepError, match="sets run.seed, which sweeps.odd.seeds sets for every row"):
        sweep_definition(base, "odd")
    base["sweeps"]["odd"] = {"r": [1, 2]}
    with pytest.raises(SweepError, match=r"sweeps\.odd\.r: expected a mapping of params keys to values"):
        sweep_rows(base, "odd")
    with pytest.raises(SweepError, match="is not a sweep run folder"):
        parse_run("a/b/c")
    assert parse_run("baseline") == ("baseline", None) and parse_run("seeds/seed3") == (None, 3)
    # the strict loader takes a seeds list and still refuses a row that is neither mapping nor list
    with pytest.raises(ConfigError, match=r"sweeps\.ablation\.baseline: expected dict\[str, Any\] \| list\[int\]"):
        load_params(write_params(tmp_path / "p.yaml", {"sweeps.ablation.baseline": 3}))
    assert load_params(REPO / "params.yaml").sweeps["ablation"]["seeds"] == [0, 1, 2]


def test_dvc_queue_and_collect_with_seeds(tmp_path):
    """One experiment per (row, seed), named <sweep>-<row>-seed<k> with -S run.seed=k; collect reads
    each experiment's evaluate, train_generator and correlation metrics into one line."""
    rows = {"a": {"generator.depth": 2}, "b": {"generator.depth": 3}}
    params = write_params(tmp_path / "params.yaml", {"sweeps": {"g": {"seeds": [4, 7], **rows}}})
    commands = experiment_commands(params, "g")
    assert [c[5] for c in commands] == ["g-a-seed4", "g-a-seed7", "g-b-seed4", "g-b-seed7"]
    assert commands[1][-2:] == ["-S", "run.seed=7"] and "generator.depth=3" in commands[3]

    def record(name, fid, loss, r2):
        return {"revs": [{"name": name, "data": {"metrics": {
            "metrics/evaluate.json": {"data": {"fid": fid, "fid_truncated": {"0": fid, "2": fid + 1}}},
            "metrics/train_generator.json": {"data": {"val_loss": loss, "val_accuracy": 0.5}},
            "metrics/correlation.json": {"data": {"spectral": {"r2_t2": r2, "average": r2}, "paper_table1": {}}}}}}]}

    show = [{"rev": "abc", "experiments": [record("g-a-seed4", 10.0, 1.0, 0.7), record("g-b-seed7", 20.0, 2.0, 0.8)]}]
    table = {(line["row"], line["seed"]): line for line in table_from_experiments(yaml.safe_load(params.read_text()),
                                                                                   "g", show)}
    assert set(table) == {("a", 4), ("a", 7), ("b", 4), ("b", 7)}
    assert table[("a", 4)]["fid"] == 10.0 and table[("a", 4)]["fid_drop2"] == 11.0
    assert table[("b", 7)]["generator_val_loss"] == 2.0 and table[("b", 7)]["r2_spectral_average"] == 0.8
    assert table[("a", 7)]["fid"] is None and table[("a", 7)]["generator_val_loss"] is None  # not run
    assert list(table[("a", 4)])[:3] == ["row", "depth", "seed"]


def test_prepare_reads_no_seed(tmp_path, monkeypatch):
    """SEED_FREE: prepare's output is the same bytes at any run.seed, so every seed shares it."""
    from spectralar.cli import main as stage_main

    assert SEED_FREE == ("prepare",)
    fashion = make_fashion_dir(tmp_path / "fashion")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for seed in (0, 1):
        write_params(tmp_path / f"p{seed}.yaml", {"data.fashion_mnist_dir": str(fashion), **TINY, "run.seed": seed})
        assert stage_main(["prepare", "--params", f"p{seed}.yaml", "--metrics", f"m{seed}.json", "--out", f"d{seed}"]) == 0
        outputs.append({p.relative_to(tmp_path / f"d{seed}"): p.read_bytes()
                        for p in sorted((tmp_path / f"d{seed}").rglob("*")) if p.is_file() and p.name != "config.json"})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 2


# --------------------------------------------------------------------------------------------
# A tiny seeded Table 4 end to end: 2 rows x 2 seeds, aggregated, reported
# --------------------------------------------------------------------------------------------

SWITCHES = ("spectral_supervision", "causal_mask", "nonuniform_mapping")
TINY_SEEDED = {"seeds": [0, 1],  # 0 = params.yaml's run.seed: the main pipeline is nonuniform at seed 0
               "baseline": {f"tokenizer.{s}": False for s in SWITCHES},
               "nonuniform": {f"tokenizer.{s}": True for s in SWITCHES}}


def _seeded_project(root: Path) -> Path:
    """dvc.yaml and a TINY params.yaml whose sweeps.ablation is TINY_SEEDED; with ``code`` the files
    Snakemake needs too (the package is linked, as the rules list it as input)."""
    project = root / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project)
    fashion = make_fashion_dir(root / "fashion")
    write_params(project / "params.yaml", {"data.fashion_mnist_dir": str(fashion), **TINY,
                                           "sweeps": {"ablation": TINY_SEEDED}})
    return project


def _run_in_process(command: str) -> None:
    """A stage command of dvc.yaml or of a sweep run, in this process (one torch import for all)."""
    from spectralar.cli import main as stage_main

    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "spectralar"], command
    assert stage_main(words[3:]) == 0, command


def _csv(path: Path) -> list[dict[str, str]]:
    return read_table(path)


def test_a_tiny_seeded_sweep_is_averaged_over_seeds_in_the_report(tmp_path, monkeypatch):
    """The Snakemake path's commands (RowPlan) of 2 rows x 2 seeds on the TINY config, run in this
    process: the sweep table has a line per (row, seed), and reports/ablation.csv and correlation.csv
    hold those lines plus summaries equal to numpy's mean and sample std (ddof=1) of them."""
    import numpy as np
    import torch

    from spectralar.sweep import main as sweep_main

    torch.set_num_threads(1)
    project = _seeded_project(tmp_path)
    monkeypatch.chdir(project)
    dag, base = load_dag("dvc.yaml"), yaml.safe_load(Path("params.yaml").read_text())
    order = [stage for stage in topological_order(dag) if stage != "report"]
    for stage in order:  # the main pipeline: nonuniform at seed 0
        _run_in_process(dag[stage].cmd)
    for row, seed in [(None, 1), *sweep_runs(base, "ablation")]:  # seed 1's shared stages first, then each run
        plan = RowPlan(dag, base, "ablation", row, seed)
        if plan.specific:
            assert sweep_main(["params", *shlex.split(plan.arguments())]) == 0
        for stage in (s for s in order if s in plan.specific):
            _run_in_process(plan.command(stage))
    assert not Path("runs/ablation/nonuniform").exists()  # at seed 0 the main pipeline, at seed 1 seed 1's
    assert sweep_main(["table", "ablation"]) == 0
    _run_in_process(dag["report"].cmd)

    runs = {(line["row"], int(line["seed"])): line for line in _csv(project / "runs/ablation/table.csv")}
    assert set(runs) == {("baseline", 0), ("baseline", 1), ("nonuniform", 0), ("nonuniform", 1)}
    main_fid = json.loads(Path("metrics/evaluate.json").read_text())["fid"]
    seed1_fid = json.loads(Path("runs/ablation/seeds/seed1/metrics/evaluate.json").read_text())["fid"]
    assert float(runs[("nonuniform", 0)]["fid"]) == pytest.approx(main_fid)
    assert float(runs[("nonuniform", 1)]["fid"]) == pytest.approx(seed1_fid) and seed1_fid != pytest.approx(main_fid)
    assert float(runs[("baseline", 0)]["fid"]) != pytest.approx(float(runs[("baseline", 1)]["fid"]))

    ablation = _csv(project / "reports/ablation.csv")
    assert list(ablation[0])[:4] == ["row", *SWITCHES]
    for row in ("baseline", "nonuniform"):
        seeds = [line for line in ablation if line["row"] == row and line["kind"] == "seed"]
        (summary,) = [line for line in ablation if line["row"] == row and line["kind"] == "mean ± std"]
        assert [int(line["seed"]) for line in seeds] == [0, 1]
        assert summary["num_seeds"] == "2" and summary["seeds"] == "0 1" and summary["source"] == "sweep"
        for metric in ("fid", "inception_score", "class_accuracy", "rfid", "fid_drop2", "generator_val_loss",
                       "generator_val_accuracy"):
            values = np.array([float(runs[(row, s)][metric]) for s in (0, 1)])
            assert [float(line[metric]) for line in seeds] == pytest.approx(values)
            assert float(summary[metric]) == pytest.approx(values.mean())
            assert float(summary[f"{metric}_std"]) == pytest.approx(values.std(ddof=1))
        gap = np.array([float(runs[(row, s)]["fid"]) - float(runs[(row, s)]["rfid"]) for s in (0, 1)])
        assert float(summary["fid_minus_rfid"]) == pytest.approx(gap.mean())
        assert float(summary["fid_minus_rfid_std"]) == pytest.approx(gap.std(ddof=1))

    correlation = _csv(project / "reports/correlation.csv")
    measured = {0: json.loads(Path("metrics/correlation.json").read_text()),
                1: json.loads(Path("runs/ablation/seeds/seed1/metrics/correlation.json").read_text())}
    for paradigm in ("raster", "scale", "spectral"):
        (summary,) = [line for line in correlation if line["paradigm"] == paradigm and line["kind"] == "mean ± std"]
        values = np.array([measured[s][paradigm]["average"] for s in (0, 1)])
        assert float(summary["average"]) == pytest.approx(values.mean())
        assert float(summary["average_std"]) == pytest.approx(values.std(ddof=1)) and summary["seeds"] == "0 1"

    report = Path("reports/report.md").read_text()
    table4 = report[report.index("## Ablation (Table 4)"):report.index("## Truncated generation")]
    fid = [line for line in ablation if line["row"] == "baseline" and line["kind"] == "mean ± std"][0]
    assert f"{float(fid['fid']):.4g} ± {float(fid['fid_std']):.2g}" in table4
    assert "sample standard deviation (ddof=1)" in table4 and "Paper's claim (gFID, lower is better)" in table4
    assert "baseline → nonuniform" in table4
    assert " ± " in report[report.index("## Token correlation (Table 1)"):]


def test_snakemake_plans_the_seeded_ablation_from_the_same_rows(tmp_path):
    """`snakemake -n ablation` on 2 rows x 2 seeds: seed 1's shared stages once under seeds/seed1 (params.yaml's
    row at seed 1 is all of them), each other run its tokenizer chain in its own folder, nothing for
    params.yaml's row at params.yaml's seed."""
    import re
    import subprocess
    import sys

    project = _seeded_project(tmp_path)
    shutil.copy(REPO / "Snakefile", project)
    shutil.copytree(REPO / "workflow", project / "workflow")
    (project / "spectralar").symlink_to(REPO / "spectralar")
    snakemake = Path(sys.executable).parent / "snakemake"
    result = subprocess.run([str(snakemake), "-n", "ablation", "--cores", "1"], cwd=project, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = set(re.findall(r"^rule (sweep_\w+):\n(?:    .*\n)*?    wildcards: sweep=ablation, run=(\S+)$",
                          result.stdout, re.M))
    chain = {"extract_proxy_codes", "train_tokenizer", "dump_tokens", "train_generator", "sample", "evaluate"}
    shared = chain | {"train_proxy", "train_evalnet", "reference_stats", "correlation"}
    expected = ({(f"sweep_{s}", "seeds/seed1") for s in shared} | {(f"sweep_{s}", "baseline/seed0") for s in chain}
                | {(f"sweep_{s}", "baseline/seed1") for s in chain})
    assert jobs == expected
