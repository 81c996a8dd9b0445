"""DVC and Snakemake run one pipeline, declared once in dvc.yaml, and both run it end to end."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spectralar.dag import code_files, load_dag, upstream
from spectralar.stages import GPU_STAGES, STAGES, stage_info
from tests.conftest import REPO, TINY, make_fashion_dir, write_params

BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    """The orchestrators' environment, with Python writing its bytecode cache as it does by default (a
    machine that sets PYTHONDONTWRITEBYTECODE would hide a stage whose imports change another's deps)."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SPECTRALAR_TRACKING="0",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


def dvc_stages(project: Path = REPO) -> dict[str, dict]:
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        def paths(key):
            return [o if isinstance(o, str) else next(iter(o)) for o in stage.get(key, [])]

        out[name] = {"cmd": stage["cmd"], "deps": stage.get("deps", []), "params": sorted(stage.get("params", [])),
                     "outs": sorted(paths("outs") + paths("metrics") + paths("plots")), "metrics": paths("metrics")}
    return out


def as_snakemake_inputs(stages: dict[str, dict], dep: str, project: Path = REPO) -> list[str]:
    """A dep inside another stage's output is that output (Snakemake matches outputs, not files in them);
    a dep no stage makes (code) is its files (a directory's mtime does not see an edit inside it)."""
    made = next((out for stage in stages.values() for out in stage["outs"] if dep == out or dep.startswith(out + "/")),
                None)
    return [made] if made is not None else code_files(dep, project)


def flag_paths(cmd: str) -> dict[str, str]:
    """``--flag value`` of a command, keyed as Snakemake names them (``--metrics-dir`` -> ``metrics_dir``)."""
    return {flag.replace("-", "_"): value for flag, value in re.findall(r"--([\w-]+) ([^-\s]\S*)", cmd)}


def snakemake_jobs(project: Path = REPO, *targets: str) -> dict[str, dict]:
    """Jobs as Snakemake itself resolves them: a dry run of every job (``-n -p --forceall``)."""
    text = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "16", *targets],
        cwd=project, env=_env(), capture_output=True, text=True, check=True,
    ).stdout
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=rule \w+:)", text):
        head = re.match(r"rule (\w+):", block)
        if not head:
            continue

        def field(key: str) -> str:
            found = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            return found.group(1) if found else ""

        command = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs[head.group(1)] = {
            "cmd": command.group(1) if command else None,
            "input": field("input").split(", ") if field("input") else [],
            "output": field("output").split(", ") if field("output") else [],
            "log": field("log"),
            "threads": int(field("threads") or 1),
            "resources": dict(item.split("=", 1) for item in field("resources").split(", ") if "=" in item),
        }
    return jobs


RULE_DUMP = """include: {snakefile!r}

import json as _json

_json.dump({{name: {{"input": dict(getattr(rules, name).input.items()),
                    "output": dict(getattr(rules, name).output.items()),
                    "params": dict(getattr(rules, name).params.items())}}
            for name in {names!r}}}, open({out!r}, "w"), default=str)
"""


def snakemake_rules(scratch: Path, project: Path = REPO) -> dict[str, dict]:
    """Each stage rule's named inputs, outputs and params as Snakemake holds them: a Snakefile that
    includes the project's and writes ``rules.<stage>`` out."""
    scratch.mkdir(parents=True, exist_ok=True)
    wrapper, out = scratch / "Snakefile", scratch / "rules.json"
    wrapper.write_text(RULE_DUMP.format(snakefile=str(project / "Snakefile"), names=list(dvc_stages(project)),
                                        out=str(out)))
    subprocess.run([str(BIN / "snakemake"), "-s", str(wrapper), "-d", str(project), "--list-rules"],
                   cwd=project, env=_env(), capture_output=True, text=True, check=True)
    return json.loads(out.read_text())


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


REPORT_DUMP = """include: {snakefile!r}

import json as _json
from snakemake.io import is_flagged as _is_flagged

_json.dump({{name: {{str(f): {{"category": f.flags["report"].category, "caption": str(f.flags["report"].caption),
                              "patterns": f.flags["report"].patterns}}
                    for f in getattr(rules, name).rule.output if _is_flagged(f, "report")}}
            for name in {names!r}}}, open({out!r}, "w"))
"""


def report_marks(scratch: Path, project: Path = REPO) -> dict[str, dict]:
    """Per stage rule, its outputs marked for ``snakemake --report`` with their category and caption."""
    scratch.mkdir(parents=True, exist_ok=True)
    wrapper, out = scratch / "Snakefile", scratch / "report.json"
    wrapper.write_text(REPORT_DUMP.format(snakefile=str(project / "Snakefile"), names=list(dvc_stages(project)),
                                          out=str(out)))
    subprocess.run([str(BIN / "snakemake"), "-s", str(wrapper), "-d", str(project), "--list-rules"],
                   cwd=project, env=_env(), capture_output=True, text=True, check=True)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def jobs():
    return snakemake_jobs()


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    return snakemake_rules(tmp_path_factory.mktemp("rules"))


def check_jobs_follow_dvc_yaml(stages: dict[str, dict], jobs: dict[str, dict], project: Path = REPO) -> None:
    """Every dvc.yaml stage is a job of the rule of its name with exactly its command (stderr to the
    rule's log), its deps as inputs (directory-mapped), its outs and metrics as outputs."""
    for name, stage in stages.items():
        job = jobs[name]
        assert job["log"] == f"logs/{name}.log", name
        assert job["cmd"] == f"{stage['cmd']} 2> logs/{name}.log", name
        expected = {path for dep in stage["deps"] for path in as_snakemake_inputs(stages, dep, project)}
        assert expected <= set(job["input"]), name
        # the only other inputs: sweep tables the command passes, once a sweep has written them
        sweep_tables = {p for p in flag_paths(stage["cmd"]).values() if re.fullmatch(r"runs/[\w-]+/table\.csv", p)}
        assert set(job["input"]) - expected <= sweep_tables, name
        assert sorted(job["output"]) == stage["outs"], name
        assert job["resources"]["gpu"] == str(int(name in GPU_STAGES)), name
    assert sorted(jobs["all"]["input"]) == sorted(m for stage in stages.values() for m in stage["metrics"])


def check_rules_follow_dvc_yaml(stages: dict[str, dict], rules: dict[str, dict], params: dict) -> None:
    """Inputs and outputs are named after the flags that pass them; params are the stage's sections."""
    for name, stage in stages.items():
        rule = rules[name]
        assert rule["params"]["sections"] == {section: params[section] for section in stage["params"]}, name
        for flag, path in flag_paths(stage["cmd"]).items():
            if path in stage["deps"]:
                assert set(as_snakemake_inputs(stages, path)) <= set(_listed(rule["input"][flag])), (name, flag)
            if path in stage["outs"]:
                assert path in _listed(rule["output"][flag]), (name, flag)
        assert _listed(rule["output"]["metrics"]) == stage["metrics"], name


def test_every_dvc_stage_is_a_snakemake_job_with_its_command_deps_and_outs(jobs):
    stages = dvc_stages()
    assert list(stages) == list(STAGES)
    # sweep jobs join in only once a sweep table exists (the report reads it)
    assert {job for job in jobs if not job.startswith("sweep_")} == set(stages) | {"all"}
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"python -m spectralar {name} --params params.yaml")
    check_jobs_follow_dvc_yaml(stages, jobs)


def test_snakemake_rules_name_their_files_by_flag_and_hold_the_stage_params(rules):
    check_rules_follow_dvc_yaml(dvc_stages(), rules, yaml.safe_load((REPO / "params.yaml").read_text()))


def test_stage_params_match_the_stage_modules():
    for name, stage in dvc_stages().items():
        assert stage["params"] == sorted(stage_info(name).sections), name


def test_a_stage_added_to_dvc_yaml_needs_no_snakemake_edit(tmp_path):
    """One more entry in dvc.yaml (a stage the stage table does not know yet) is one more rule."""
    project = tmp_path / "project"
    for name in ("Snakefile", "dvc.yaml", "params.yaml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, project / name)
    for name in ("workflow", "spectralar"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "spectralar" / "stages" / "histogram.py").write_text('"""A new stage."""\n')
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["histogram"] = {
        "cmd": "python -m spectralar histogram --params params.yaml --metrics metrics/histogram.json "
               "--data data/prepared --tokenizer models/tokenizer/tokenizer.pt --out reports/histogram",
        "deps": ["spectralar/data", "spectralar/stages/histogram.py", "data/prepared", "models/tokenizer/tokenizer.pt"],
        "params": ["run", "sample"],
        "outs": ["reports/histogram"],
        "metrics": [{"metrics/histogram.json": {"cache": False}}],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    stages, jobs = dvc_stages(project), snakemake_jobs(project)
    assert set(jobs) == set(stages) | {"all"} and "histogram" in jobs  # a fresh copy: no sweep table
    check_jobs_follow_dvc_yaml(stages, jobs, project)
    assert jobs["histogram"]["resources"]["gpu"] == "0" and jobs["histogram"]["threads"] == 16
    rules = snakemake_rules(tmp_path / "rules", project)
    check_rules_follow_dvc_yaml(stages, rules, yaml.safe_load((project / "params.yaml").read_text()))
    assert rules["histogram"]["input"]["tokenizer"] == "models/tokenizer"
    assert sorted(_listed(rules["histogram"]["input"]["code"])) == \
        code_files("spectralar/data", project) + ["spectralar/stages/histogram.py"]


HELLO_MODULE = '''"""hello: a throwaway stage (tests/test_orchestration.py adds it to a copy of the project)."""

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HelloConfig:
    greeting: str = "hello"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/hello")


def run(ctx) -> dict:
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "greeting.txt").write_text(ctx.params.hello.greeting)
    return {"characters": len(ctx.params.hello.greeting)}
'''


def test_adding_a_stage_takes_its_module_a_table_line_a_dvc_stage_and_its_params(tmp_path):
    """README "Adding a stage", done literally in a copy: the module, one line in the stage table, one
    entry in dvc.yaml, its params section. Then the CLI, Snakemake and DVC all run it."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Snakefile", "dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, project / name)
    for name in ("workflow", "spectralar", ".dvc"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    (project / "spectralar" / "stages" / "hello.py").write_text(HELLO_MODULE)
    table = project / "spectralar" / "stages" / "__init__.py"
    table.write_text(table.read_text().replace(
        "    StageInfo(\"report\",",
        "    StageInfo(\"hello\", (\"run\", \"hello\"), \"say hello\", config=_CONFIG.format(\"hello\", \"HelloConfig\")),\n"
        "    StageInfo(\"report\","))
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\nhello:\n  greeting: bonjour\n")
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["hello"] = {
        "cmd": "python -m spectralar hello --params params.yaml --metrics metrics/hello.json --out reports/hello",
        "deps": ["spectralar/stages/hello.py"], "params": ["hello", "run"], "outs": ["reports/hello"],
        "metrics": [{"metrics/hello.json": {"cache": False}}],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # the copy's package, not the installed one, for every process below
    env = _env(PYTHONPATH=str(project))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)

    snakemake = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "metrics/hello.json"], cwd=project, env=env,
                               capture_output=True, text=True)
    assert snakemake.returncode == 0, snakemake.stdout + snakemake.stderr
    assert (project / "reports" / "hello" / "greeting.txt").read_text() == "bonjour"
    assert json.loads((project / "metrics" / "hello.json").read_text())["characters"] == 7
    shutil.rmtree(project / "reports" / "hello")
    dvc = subprocess.run([str(BIN / "dvc"), "repro", "hello"], cwd=project, env=env, capture_output=True, text=True)
    assert dvc.returncode == 0, dvc.stdout + dvc.stderr
    assert (project / "reports" / "hello" / "greeting.txt").read_text() == "bonjour"


def test_evaluate_does_not_depend_on_training_code():
    """Stages side by side: evaluate reads the files training wrote, through spectralar.artifacts."""
    deps = stage_code_deps("evaluate")
    assert not [d for d in deps if d.startswith("spectralar/stages/") and d != "spectralar/stages/common.py"
                and d != "spectralar/stages/evaluate.py"], deps


def _workflow_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Snakefile", "dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    for name in ("workflow", "configs", "spectralar"):  # the package's code is an input of every rule
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _shell_commands(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stdout + result.stderr
    commands = re.findall(r"^\s*(?:Shell command: )?(python -m spectralar (\w+) .*)$", result.stdout, re.M)
    return {stage: command for command, stage in commands}


def test_snakemake_config_overrides_change_what_runs(tmp_path):
    """--config and --configfile are honoured: the commands read the resolved, validated params file."""
    project = _workflow_copy(tmp_path)
    plain = _shell_commands(_run(project, "snakemake", "-n", "-p", "--forceall", "--cores", "1"))
    assert "--params params.yaml " in plain["train_generator"]
    assert not (project / "runs" / "params").exists()  # no override: nothing resolved

    overridden = _shell_commands(_run(project, "snakemake", "-n", "-p", "--forceall", "--cores", "1",
                                      "--config", 'generator={"depth": 6}'))
    assert set(overridden) == set(plain)
    for stage, command in overridden.items():
        assert command == plain[stage].replace("--params params.yaml", "--params runs/params/snakemake.yaml")
    from spectralar.config import load_params

    resolved = load_params(project / "runs" / "params" / "snakemake.yaml")
    assert resolved.generator.depth == 6 and resolved.generator.mlp_ratio == load_params(REPO / "params.yaml").generator.mlp_ratio

    _shell_commands(_run(project, "snakemake", "-n", "-p", "--forceall", "--cores", "1",
                         "--configfile", "configs/imagenet-d16.yaml"))
    resolved = load_params(project / "runs" / "params" / "snakemake.yaml")
    assert resolved.data.source == "imagefolder" and resolved.generator.depth == 16


def test_snakemake_refuses_an_invalid_override_with_the_key(tmp_path):
    project = _workflow_copy(tmp_path)
    result = _run(project, "snakemake", "-n", "--cores", "1", "--config", 'generator={"depth": "six"}')
    assert result.returncode != 0
    assert "generator.depth: expected int, got 'six'" in result.stdout + result.stderr


TOY_COMMAND = ("python -c \"import sys; from pathlib import Path; Path(sys.argv[-3]).mkdir(); "
               "Path(sys.argv[-1]).write_text(sys.argv[-3])\" {inputs}--out out/{name} --metrics metrics/{name}.json")


def test_each_generated_rule_runs_its_own_command(tmp_path):
    """Jobs really run (a dry run prints each rule's command but never executes it): on a two-stage
    toy dvc.yaml, each stage's job writes its own outputs."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "workflow", project / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    stages = {"one": {"cmd": TOY_COMMAND.format(name="one", inputs=""), "deps": [], "params": ["run"],
                      "outs": ["out/one"], "metrics": [{"metrics/one.json": {"cache": False}}]},
              "two": {"cmd": TOY_COMMAND.format(name="two", inputs="--first out/one "), "deps": ["out/one"],
                      "params": ["run"], "outs": ["out/two"], "metrics": [{"metrics/two.json": {"cache": False}}]}}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    result = subprocess.run([str(BIN / "snakemake"), "--cores", "1"], cwd=project, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in stages:
        assert (project / "metrics" / f"{name}.json").read_text() == f"out/{name}", name
        assert (project / "out" / name).is_dir() and (project / "logs" / f"{name}.log").is_file(), name


def test_slurm_resources_name_existing_rules_and_give_the_gpu_stages_gpus():
    rules = subprocess.run([str(BIN / "snakemake"), "--list-rules"], cwd=REPO, env=_env(), capture_output=True,
                           text=True, check=True).stdout.split()
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert set(profile["set-resources"]) <= set(rules)
    assert {rule for rule, res in profile["set-resources"].items() if res.get("gpu")} == GPU_STAGES


# Code whose change cannot change a stage's outputs: tracking, logging, CLI plumbing, file helpers and
# the params loader (the params values themselves are dependencies).
INFRASTRUCTURE = {"spectralar/cli.py", "spectralar/log.py", "spectralar/io.py", "spectralar/config.py",
                  "spectralar/__init__.py", "spectralar/__main__.py", "spectralar/stages/__init__.py",
                  "spectralar/stages/context.py",  # the CLI's stage plumbing (lock, MLflow run, outputs)
                  "spectralar/dag.py"}  # reads dvc.yaml for the orchestrators and the sweeps' plans
CODE_DIRS = ("spectralar/data", "spectralar/models", "spectralar/spectral", "spectralar/training",
             "spectralar/evaluation")
# Modules a stage imports inside functions (to keep load_params, which imports every stage module for
# its config class, free of torch-fidelity and torchvision): the scan imports them in the stage's child too
LAZY_IMPORTS = {"report": ["spectralar.sweep"],
                "reference_stats": ["spectralar.evaluation.extractors", "spectralar.evaluation.metrics"],
                "evaluate": ["spectralar.evaluation.extractors", "spectralar.evaluation.metrics"]}


# One interpreter imports the third-party libraries (none of them imports spectralar), then forks a
# child per stage that imports the stage module from there: each child sees exactly the spectralar
# modules a fresh interpreter would, without paying torch's import twelve times.
_IMPORT_SCAN = """
import importlib, json, os, sys
for library in ("numpy", "scipy", "scipy.linalg", "torch", "torch.nn.functional", "torch.distributed",
                "torchvision", "PIL.Image", "yaml", "matplotlib", "matplotlib.pyplot", "torch_fidelity", "mlflow"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
assert not [n for n in sys.modules if n.startswith("spectralar")]
found = {}
for argument in sys.argv[1:]:
    stage, _, lazy = argument.partition("=")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        for module in ["spectralar.stages." + stage, *filter(None, lazy.split(","))]:
            importlib.import_module(module)
        files = [os.path.relpath(m.__file__) for n, m in list(sys.modules.items())
                 if n.startswith("spectralar") and getattr(m, "__file__", None)]
        os.write(write, json.dumps(files).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[stage] = json.loads(pipe.read())
    assert os.waitpid(pid, 0)[1] == 0, stage
print(json.dumps(found))
"""


@functools.lru_cache(maxsize=1)
def _stage_imports() -> dict[str, list[str]]:
    """{stage: the spectralar files its module (and its LAZY_IMPORTS) import in a fresh interpreter}."""
    arguments = [f"{stage}={','.join(LAZY_IMPORTS.get(stage, []))}" for stage in STAGES]
    out = subprocess.run([sys.executable, "-c", _IMPORT_SCAN, *arguments], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def stage_code_deps(stage: str) -> list[str]:
    """The code a stage's outputs depend on: the spectralar files its module imports (in a fresh
    interpreter), as directories for the library packages and as files for stage modules."""
    deps = set()
    for path in _stage_imports()[stage]:
        if path in INFRASTRUCTURE or path.startswith("spectralar/tracking"):
            continue
        deps.add(next((d for d in CODE_DIRS if path.startswith(d + "/")), path))
    return sorted(deps)


def _function_level_imports(stage: str) -> set[str]:
    """The spectralar modules a stage module imports inside its functions."""
    tree = ast.parse((REPO / "spectralar" / "stages" / f"{stage}.py").read_text())
    found = set()
    for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectralar"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("spectralar")}
    return found


def test_every_import_inside_a_stage_function_is_in_the_scan():
    """A spectralar module imported inside a stage's function is invisible to an import of the stage
    module: it must be listed in LAZY_IMPORTS (or be code that is not a dependency), or dvc.yaml would
    miss code the stage runs."""
    for stage in STAGES:
        scanned = set(_stage_imports()[stage])
        for module in _function_level_imports(stage):
            path = module.replace(".", "/")
            files = {f"{path}.py", f"{path}/__init__.py"}
            if files & (INFRASTRUCTURE | scanned) or path.startswith("spectralar/tracking"):
                continue
            pytest.fail(f"{stage} imports {module} inside a function: add it to LAZY_IMPORTS[{stage!r}]")


def test_the_import_scan_equals_a_fresh_interpreter():
    """The forked scan above against a plain fresh interpreter, for one stage and its lazy imports."""
    script = ("import importlib, os, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
              "print('\\n'.join(os.path.relpath(m.__file__) for n, m in list(sys.modules.items()) "
              "if n.startswith('spectralar') and getattr(m, '__file__', None)))")
    fresh = subprocess.run([sys.executable, "-c", script, "spectralar.stages.evaluate", *LAZY_IMPORTS["evaluate"]], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(fresh) == sorted(_stage_imports()["evaluate"]) and "spectralar/stages/evaluate.py" in fresh


def test_generated_rules_mark_the_results_for_the_snakemake_report(tmp_path):
    """The stage rules carry report() on the outputs spectralar.dag.REPORT_OUTPUTS names, with its
    category and its caption under workflow/report/."""
    from spectralar.dag import REPORT_OUTPUTS

    marks = report_marks(tmp_path)
    marked = {path: mark for outputs in marks.values() for path, mark in outputs.items()}
    assert set(marked) == set(REPORT_OUTPUTS)
    assert set(marks["sample"]) == {"samples"} and set(marks["report"]) >= {"reports/ablation.csv", "reports/figures"}
    for path, mark in marked.items():
        assert mark["category"] == REPORT_OUTPUTS[path].category, path
        assert mark["caption"].endswith(REPORT_OUTPUTS[path].caption), path
        assert mark["patterns"] == list(REPORT_OUTPUTS[path].patterns), path


def test_every_stage_declares_the_code_it_imports(rules):
    """dvc.yaml lists exactly the code each stage's outputs depend on, and Snakemake's rule has it as input.code."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        expected = stage_code_deps(name)
        assert sorted(d for d in spec[name]["deps"] if d.startswith("spectralar")) == expected, name
        expected_files = sorted(path for dep in expected for path in code_files(dep, REPO))
        assert sorted(_listed(rules[name]["input"]["code"])) == expected_files, name


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
TINY_SWEEPS = {
    "ablation": {  # two rows keep the suite short: one runs, one is the main pipeline
        "baseline": {"tokenizer.spectral_supervision": False, "tokenizer.causal_mask": False,
                     "tokenizer.nonuniform_mapping": False},
        "nonuniform": {"tokenizer.spectral_supervision": True, "tokenizer.causal_mask": True,
                       "tokenizer.nonuniform_mapping": True}},
    # DVC's experiments run this one: a row that reruns only sampling onwards, and the main pipeline's
    # own value (the ablation's rows, tokenizers retrained, run end to end through Snakemake below). The
    # boolean, which reruns nothing, checks that `-S key=true` reaches the stages as a YAML boolean, as the
    # ablation's switches must (the strict params loader fails a run on the string "true").
    "temperature": {"cold": {"sample.temperature": 0.5, "tracking.log_checkpoints": True},
                    "main": {"sample.temperature": 1.0}}}


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
def test_dvc_experiments_run_a_sweeps_rows_and_record_them_in_the_projects_store(dvc_project):
    """One `dvc exp run --temp` per row (spectralar.sweep run), the experiments' rows collected, and the
    stages an experiment ran (in DVC's temporary copy) recorded in the project's own mlflow.db. Not DVC's
    queue: `dvc exp run --run-all` can hang after one or two tasks (its celery worker's filesystem broker
    reads a half-written message, treeverse/dvc#10398, #10428), as this test once did on a 2-core CI machine."""
    from mlflow.tracking import MlflowClient
    from spectralar.sweep import read_table

    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"]):
        subprocess.run(cmd, cwd=dvc_project, check=True, capture_output=True)
    ran = _run(dvc_project, "python", "-m", "spectralar.sweep", "run", "temperature", SPECTRALAR_TRACKING="1")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert ran.stdout.count("dvc exp run --temp -n temperature-") == 2, ran.stdout[-3000:]
    collected = _run(dvc_project, "python", "-m", "spectralar.sweep", "collect", "temperature")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    table = {row["row"]: row for row in read_table(dvc_project / "runs" / "temperature" / "table.csv")}
    assert set(table) == {"cold", "main"}
    assert table["cold"]["temperature"] == "0.5" and table["cold"]["log_checkpoints"] == "true"
    assert float(table["cold"]["fid"]) > 0
    main = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    assert float(table["main"]["fid"]) == pytest.approx(main["fid"])  # same params, same result
    assert float(table["cold"]["fid"]) != pytest.approx(main["fid"])

    client = MlflowClient(tracking_uri=f"sqlite:///{dvc_project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("spectralar").experiment_id], max_results=1000)
    copies = {r.info.run_id for r in runs if ".dvc/tmp/exps" in r.data.tags.get("spectralar.workdir", "")}
    in_copies = {r.data.tags.get("spectralar.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") in copies}
    assert {"sample", "evaluate"} <= in_copies, in_copies  # the cold row's stages, run in DVC's copy
    assert not list(dvc_project.glob(".dvc/tmp/exps/**/mlflow.db"))  # nothing recorded into a copy


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory):
    project = _project_copy(tmp_path_factory.mktemp("smk"))
    _set_params(project, {"sweeps": TINY_SWEEPS})
    result = _run(project, "snakemake", "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return project


def _jobs(project: Path, *extra: str) -> set[str]:
    """Rules a dry run would execute."""
    result = _run(project, "snakemake", "-n", "--cores", "1", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"^rule (\w+):", result.stdout, re.M)) - {"all"}


@pytest.mark.slow
def test_snakemake_end_to_end(snakemake_project):
    for stage in STAGES:
        assert (snakemake_project / "metrics" / f"{stage}.json").is_file(), stage
    assert (snakemake_project / "models" / "tokenizer" / "prefixes.png").is_file()
    assert (snakemake_project / "reports" / "figures" / "progression.gif").is_file()


@pytest.mark.slow
def test_snakemake_report_shows_the_figures_and_tables_by_category(snakemake_project):
    """`snakemake --report report.zip` after a run: the figures and tables with their captions."""
    import zipfile

    result = _run(snakemake_project, "snakemake", "--report", "report.zip", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with zipfile.ZipFile(snakemake_project / "report.zip") as archive:
        names = {Path(name).name for name in archive.namelist()}
        html = archive.read("report/report.html").decode()
    assert {"grid.png", "grid_0_t-shirt-top.png", "progression.gif", "completion.png", "superres.png", "prefixes.png",
            "best_predictor.png", "loss_curves.png", "ablation.csv", "truncation.csv", "generation.csv"} <= names
    for category in ("Samples", "Tokenizer", "Evaluation", "Ablation"):
        assert f'"{category}"' in html, category
    assert "Coarse-to-fine generation" in html and "Table 4: the ablation" in html  # captions rendered


@pytest.mark.slow
def test_snakemake_rerun_does_nothing_and_a_generator_change_reruns_only_what_follows(snakemake_project):
    assert _jobs(snakemake_project) == set()
    _set_params(snakemake_project, {"generator.depth": 2})
    assert _jobs(snakemake_project) == GENERATOR_AND_AFTER
    _set_params(snakemake_project, {"generator.depth": 1})
    assert _jobs(snakemake_project) == set()
    # the same change given to Snakemake instead of written into params.yaml reruns the same stages
    assert _jobs(snakemake_project, "--config", 'generator={"depth": 2}') == GENERATOR_AND_AFTER
    assert _jobs(snakemake_project, "--config", 'generator={"depth": 1}') == set()  # = params.yaml


@pytest.mark.slow
def test_snakemake_reruns_what_an_in_place_module_edit_affects(snakemake_project):
    """A module edited in place (its directory's mtime unchanged) reruns the stages that list its package
    and every stage after them, as DVC's content hash does; the bytecode cache that the run's imports
    wrote into the package reruns nothing (the rerun test above)."""
    folder = snakemake_project / "spectralar" / "models"
    assert list(folder.glob("__pycache__/*.pyc"))  # the stages wrote it, as Python does by default
    dag = load_dag(snakemake_project / "dvc.yaml")
    affected = {name for name, spec in dag.items() if "spectralar/models" in spec.deps}
    while more := {name for name in dag if upstream(dag, name) & affected} - affected:
        affected |= more
    module = folder / "generator.py"
    text, before, folder_mtime = module.read_text(), module.stat(), folder.stat().st_mtime_ns
    try:
        with module.open("a") as handle:
            handle.write("\n# an edit\n")
        assert folder.stat().st_mtime_ns == folder_mtime
        assert _jobs(snakemake_project) == affected and "prepare" not in affected
    finally:
        module.write_text(text)
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
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
