"""DVC and Snakemake describe the same pipeline, and both run it end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spectralar.stages import STAGES
from tests.conftest import REPO, TINY, make_fashion_dir, write_params

BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SPECTRALAR_TRACKING="0",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.update(extra)
    return env


def dvc_stages() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", []) + stage.get("metrics", [])
                + stage.get("plots", [])]
        out[name] = {"cmd": stage["cmd"], "outs": sorted(outs), "params": sorted(stage.get("params", []))}
    return out


def snakemake_rules(cwd: Path = REPO) -> dict[str, dict]:
    """Rules as Snakemake itself resolves them (dry run of every job) plus their params sections."""
    text = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "1"],
        cwd=cwd, env=_env(), capture_output=True, text=True, check=True,
    ).stdout
    rules: dict[str, dict] = {}
    for block in re.split(r"\n(?=rule \w+:)", text):
        head = re.match(r"rule (\w+):", block)
        if not head or head.group(1) == "all":
            continue
        outputs = re.search(r"^\s+output: (.*)$", block, re.M)
        command = re.search(r"^Shell command: (.*)$", block, re.M)
        rules[head.group(1)] = {
            "cmd": re.sub(r"\s*2> logs/\S+$", "", command.group(1)),
            "outs": sorted(outputs.group(1).split(", ")),
        }
    sources = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    for match in re.finditer(r"^rule (\w+):(.*?)(?=^rule |\Z)", sources, re.M | re.S):
        sections = re.search(r"section\(([^)]*)\)", match.group(2))
        if match.group(1) in rules:
            rules[match.group(1)]["params"] = sorted(re.findall(r'"(\w+)"', sections.group(1))) if sections else []
    return rules


def test_dvc_and_snakemake_define_the_same_stages():
    dvc, smk = dvc_stages(), snakemake_rules()
    assert sorted(dvc) == sorted(smk) == sorted(STAGES)
    for name in STAGES:
        assert dvc[name]["cmd"] == smk[name]["cmd"], name
        assert dvc[name]["outs"] == smk[name]["outs"], name
        assert dvc[name]["params"] == smk[name]["params"], name
        assert dvc[name]["cmd"].startswith(f"python -m spectralar {name} --params params.yaml")


def test_stage_params_match_the_stage_modules():
    from spectralar.stages import load_stage

    for name, stage in dvc_stages().items():
        assert stage["params"] == sorted(load_stage(name).SECTIONS), name


# Code whose change cannot change a stage's outputs: tracking, logging, CLI plumbing, file helpers and
# the params loader (the params values themselves are dependencies).
INFRASTRUCTURE = {"spectralar/cli.py", "spectralar/log.py", "spectralar/io.py", "spectralar/config.py",
                  "spectralar/__init__.py", "spectralar/__main__.py", "spectralar/stages/__init__.py"}
CODE_DIRS = ("spectralar/data", "spectralar/models", "spectralar/spectral", "spectralar/training",
             "spectralar/evaluation")
LAZY_IMPORTS = {"report": ["spectralar/sweep.py"]}  # imported inside functions, invisible to the import scan


def stage_code_deps(stage: str) -> list[str]:
    """The code a stage's outputs depend on: the spectralar files its module imports (in a fresh
    interpreter), as directories for the library packages and as files for stage modules."""
    script = ("import importlib, os, sys; importlib.import_module(sys.argv[1]); "
              "print('\\n'.join(os.path.relpath(m.__file__) for n, m in list(sys.modules.items()) "
              "if n.startswith('spectralar') and getattr(m, '__file__', None)))")
    files = subprocess.run([sys.executable, "-c", script, f"spectralar.stages.{stage}"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    deps = set()
    for path in [*files, *LAZY_IMPORTS.get(stage, [])]:
        if path in INFRASTRUCTURE or path.startswith("spectralar/tracking"):
            continue
        deps.add(next((d for d in CODE_DIRS if path.startswith(d + "/")), path))
    return sorted(deps)


def test_every_stage_declares_the_code_it_imports():
    """dvc.yaml and the Snakemake rules list exactly the code each stage's outputs depend on."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    sources = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    for name in STAGES:
        expected = stage_code_deps(name)
        assert sorted(d for d in spec[name]["deps"] if d.startswith("spectralar")) == expected, name
        rule = re.search(rf"^rule {name}:\n(.*?)(?=^rule |\Z)", sources, re.M | re.S).group(1)
        inputs = rule.split("output:")[0]
        assert sorted(re.findall(r'"(spectralar[^"]*)"', inputs)) == expected, name


def test_snakemake_lint_is_clean():
    result = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def _project_copy(tmp_path: Path) -> Path:
    """A fresh clone-like copy of the tracked files, with a tiny synthetic dataset."""
    dest = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()  # uncommitted files too
    for name in set(files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    fashion = make_fashion_dir(tmp_path / "fashion")
    write_params(dest / "params.yaml", {"data.fashion_mnist_dir": str(fashion), **TINY})
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


# ------------------------------------------------------------------------------------------
# End to end on the tiny config: each orchestrator runs the whole pipeline once per module, and
# the tests below look at what it left (reruns, MLflow, sweeps).
# ------------------------------------------------------------------------------------------

GENERATOR_AND_AFTER = {"train_generator", "sample", "evaluate", "report"}
TINY_SWEEPS = {"ablation": {  # two rows keep the suite short: one runs, one is the main pipeline
    "baseline": {"tokenizer.spectral_supervision": False, "tokenizer.causal_mask": False,
                 "tokenizer.nonuniform_mapping": False},
    "nonuniform": {"tokenizer.spectral_supervision": True, "tokenizer.causal_mask": True,
                   "tokenizer.nonuniform_mapping": True}}}


def _set_params(project: Path, overrides: dict) -> None:
    from spectralar.sweep import apply_overrides

    params = apply_overrides(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _run(project: Path, *cmd: str, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=project, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _ran(output: str) -> set[str]:
    """Stages DVC executed ("Running stage 'x'"), not those restored or unchanged."""
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """The tiny pipeline through `dvc repro`, tracked in the project's own mlflow.db (default URI)."""
    project = _project_copy(tmp_path_factory.mktemp("dvc"))
    _set_params(project, {"sweeps": TINY_SWEEPS})
    first = _run(project, "dvc", "repro", SPECTRALAR_TRACKING="1")
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    assert _ran(first.stdout) == set(STAGES)
    return project


@pytest.mark.slow
def test_dvc_repro_end_to_end(dvc_project):
    for stage in STAGES:
        assert (dvc_project / "metrics" / f"{stage}.json").is_file(), stage
    assert (dvc_project / "models" / "tokenizer" / "tokenizer.pt").is_file()
    report = (dvc_project / "reports" / "report.md").read_text()
    assert "## Ablation (Table 4)" in report and "progression.png" in report
    evaluate = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    assert evaluate["num_samples"] == 20 and evaluate["fid"] > 0


@pytest.mark.slow
def test_mlflow_server_shows_every_stage_of_the_pipeline(dvc_project):
    """`mlflow server` on the project's store: a parent run, a child per stage with params/metrics/artifacts."""
    from tests.mlflow_server import serve

    with serve(f"sqlite:///{dvc_project / 'mlflow.db'}", dvc_project / "mlartifacts") as client:
        experiment = client.get_experiment_by_name("spectralar")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("spectralar.role") == "pipeline"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = {r.data.tags["spectralar.stage"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert set(children) == set(STAGES)
        for stage, run in children.items():
            assert run.info.status == "FINISHED", stage
            assert "stage_seconds" in run.data.metrics, stage
            assert any(k.startswith("run.") for k in run.data.params), stage
            assert client.list_artifacts(run.info.run_id), stage
        assert {a.path for a in client.list_artifacts(children["report"].info.run_id, "report")} >= \
            {"report/report.md", "report/ablation.csv"}
        assert parents[0].data.tags["spectralar.switch.causal_mask"] == "true"
        sample = {a.path for a in client.list_artifacts(children["sample"].info.run_id)}
        assert {"grid.png", "progression.png", "progression.gif", "completion.png"} <= sample


@pytest.mark.slow
def test_dvc_rerun_does_nothing_and_a_generator_change_reruns_only_what_follows(dvc_project):
    again = _run(dvc_project, "dvc", "repro")
    assert again.returncode == 0 and _ran(again.stdout) == set(), again.stdout
    first_metrics = (dvc_project / "metrics" / "train_generator.json").read_text()
    _set_params(dvc_project, {"generator.depth": 2})
    changed = _run(dvc_project, "dvc", "repro")
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert _ran(changed.stdout) == GENERATOR_AND_AFTER
    assert (dvc_project / "metrics" / "train_generator.json").read_text() != first_metrics
    # back: the generator stages come from DVC's run cache, metrics files included; only the report,
    # whose outputs are small git files outside the cache, runs again (and closes the MLflow record)
    _set_params(dvc_project, {"generator.depth": 1})
    back = _run(dvc_project, "dvc", "repro")
    assert back.returncode == 0 and _ran(back.stdout) == {"report"}, back.stdout
    assert "Stage 'train_generator' is cached - skipping run, checking out outputs" in back.stdout
    assert (dvc_project / "metrics" / "train_generator.json").read_text() == first_metrics


@pytest.mark.slow
def test_dvc_experiments_run_the_ablation_rows_from_the_queue(dvc_project):
    """`dvc exp run --queue` per row (spectralar.sweep queue), the queue run, the rows collected."""
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"]):
        subprocess.run(cmd, cwd=dvc_project, check=True, capture_output=True)
    queued = _run(dvc_project, "python", "-m", "spectralar.sweep", "queue", "ablation")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ran = _run(dvc_project, "dvc", "exp", "run", "--run-all", "-j", "1", SPECTRALAR_TRACKING="1")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    collected = _run(dvc_project, "python", "-m", "spectralar.sweep", "collect", "ablation")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    from spectralar.sweep import read_table

    table = {row["row"]: row for row in read_table(dvc_project / "runs" / "ablation" / "table.csv")}
    assert set(table) == {"baseline", "nonuniform"}
    assert table["baseline"]["causal_mask"] == "false" and float(table["baseline"]["fid"]) > 0
    main = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    assert float(table["nonuniform"]["fid"]) == pytest.approx(main["fid"])  # same params, same result
    assert float(table["baseline"]["fid"]) != pytest.approx(main["fid"])


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory):
    project = _project_copy(tmp_path_factory.mktemp("smk"))
    _set_params(project, {"sweeps": TINY_SWEEPS})
    result = _run(project, "snakemake", "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return project


def _jobs(project: Path) -> set[str]:
    """Rules a dry run would execute."""
    result = _run(project, "snakemake", "-n", "--cores", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"^rule (\w+):", result.stdout, re.M)) - {"all"}


@pytest.mark.slow
def test_snakemake_end_to_end(snakemake_project):
    for stage in STAGES:
        assert (snakemake_project / "metrics" / f"{stage}.json").is_file(), stage
    assert (snakemake_project / "models" / "tokenizer" / "prefixes.png").is_file()
    assert (snakemake_project / "reports" / "figures" / "progression.gif").is_file()


@pytest.mark.slow
def test_snakemake_rerun_does_nothing_and_a_generator_change_reruns_only_what_follows(snakemake_project):
    assert _jobs(snakemake_project) == set()
    _set_params(snakemake_project, {"generator.depth": 2})
    assert _jobs(snakemake_project) == GENERATOR_AND_AFTER
    _set_params(snakemake_project, {"generator.depth": 1})
    assert _jobs(snakemake_project) == set()


@pytest.mark.slow
def test_snakemake_ablation_target_runs_each_row_and_feeds_the_report(snakemake_project):
    result = _run(snakemake_project, "snakemake", "ablation", "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    row = snakemake_project / "runs" / "ablation" / "baseline"
    assert (row / "models" / "tokenizer" / "tokenizer.pt").is_file() and (row / "metrics" / "evaluate.json").is_file()
    assert "causal_mask: false" in (row / "params.yaml").read_text()
    assert not (snakemake_project / "runs" / "ablation" / "nonuniform").exists()  # = the main pipeline, reused
    from spectralar.sweep import read_table

    table = {r["row"]: r for r in read_table(snakemake_project / "runs" / "ablation" / "table.csv")}
    main = json.loads((snakemake_project / "metrics" / "evaluate.json").read_text())
    assert float(table["nonuniform"]["fid"]) == pytest.approx(main["fid"]) and float(table["baseline"]["fid"]) > 0
    assert _jobs(snakemake_project) == {"report"}  # the new sweep table is an input of the report
    result = _run(snakemake_project, "snakemake", "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["row"]: r for r in read_table(snakemake_project / "reports" / "ablation.csv")}
    assert rows["baseline"]["source"] == "sweep" and rows["nonuniform"]["source"] == "sweep"


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_snakemake_profiles_are_accepted(profile):
    """The local and SLURM profiles parse and plan the whole DAG (a dry run submits nothing)."""
    result = subprocess.run([str(BIN / "snakemake"), "-n", "--forceall", "--profile", f"workflow/profiles/{profile}"],
                            cwd=REPO, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "report" in result.stdout and "train_generator" in result.stdout
