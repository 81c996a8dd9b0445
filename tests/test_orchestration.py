"""DVC and Snakemake describe the same pipeline, and both run it end to end."""

from __future__ import annotations

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


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    project = _project_copy(tmp_path)
    run = lambda *cmd: subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True)  # noqa: E731
    first = run(str(BIN / "dvc"), "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert (project / "metrics" / f"{stage}.json").is_file(), stage
    assert (project / "models" / "tokenizer" / "tokenizer.pt").is_file()
    again = run(str(BIN / "dvc"), "repro")
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr


@pytest.mark.slow
def test_snakemake_end_to_end(tmp_path):
    project = _project_copy(tmp_path)
    result = subprocess.run([str(BIN / "snakemake"), "--cores", "2"], cwd=project, env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        assert (project / "metrics" / f"{stage}.json").is_file(), stage
    assert (project / "models" / "tokenizer" / "prefixes.png").is_file()
