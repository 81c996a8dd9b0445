"""The CLI stays light and the packages stay layered: ``--help`` and a light stage import no model or
evaluation code, every stage in the table can be run, and imports only run down the layers
(library code never imports stages, the CLI, tracking or sweeps; only tracking imports mlflow)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spectralar.stages import STAGE_TABLE
from tests.conftest import REPO, write_params

PACKAGE = REPO / "spectralar"
HEAVY = ("torch_fidelity", "timm", "spectralar.models", "spectralar.evaluation")
LIBRARY = ("models", "spectral", "data", "evaluation", "training")
STAGE_HELPERS = ("context", "common")  # modules of spectralar/stages/ that are not stages


def _modules_after(argv: list[str], parse_only: bool = False) -> tuple[int, str, set[str]]:
    """Exit code, stdout and the modules imported by ``python -m spectralar *argv`` (or by only
    parsing ``argv``), in a fresh interpreter."""
    run = ("from spectralar.cli import build_parser; build_parser().parse_args(sys.argv[1:]); code = 0"
           if parse_only else
           "import runpy\ntry:\n    runpy.run_module('spectralar', run_name='__main__', alter_sys=True)\n"
           "except SystemExit as exit:\n    code = exit.code")
    script = (f"import json, sys\n{run}\n"
              "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "300"})  # help lines unwrapped
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"] or 0, result.stdout, set(report["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_help_lists_every_stage_without_importing_one():
    code, out, modules = _modules_after(["--help"])
    assert code == 0
    listing = " ".join(out.split())
    for name, info in STAGE_TABLE.items():
        assert f" {name} {info.summary} " in listing, name
    assert not _loaded(modules, (*HEAVY, "torch", "mlflow"))
    assert {m for m in modules if m.startswith("spectralar.stages.")} == {"spectralar.stages.context"}


def test_loading_params_imports_no_evaluation_or_vision_library():
    """load_params imports every stage module for its config class, so a heavy import at the top of any
    stage module is paid by every stage process: torch-fidelity and torchvision (with torch._dynamo,
    2.5 s on CPU) are imported inside the functions that use them; timm by no stage at all."""
    script = ("import json, sys\nfrom spectralar.config import load_params\nload_params('params.yaml')\n"
              "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "spectralar.stages.evaluate" in modules and "spectralar.models.tokenizer" in modules
    assert not _loaded(modules, ("torch_fidelity", "timm", "torchvision", "torch._dynamo"))


def test_a_stage_parser_imports_only_its_own_module():
    code, out, modules = _modules_after(["prepare", "--help"])
    assert code == 0 and "--out" in out and "--params" in out and "--metrics" in out
    assert not _loaded(modules, HEAVY)
    code, _, modules = _modules_after(["prepare", "--out", "somewhere"], parse_only=True)
    assert code == 0
    assert not _loaded(modules, HEAVY)
    assert {m for m in modules if m.startswith("spectralar.stages.")} == {"spectralar.stages.context",
                                                                         "spectralar.stages.prepare"}


def test_every_stage_has_a_module_that_parses_and_runs():
    from spectralar.cli import build_parser
    from spectralar.stages import load_stage

    for name in STAGE_TABLE:
        module = load_stage(name)
        assert callable(module.add_arguments) and callable(module.run), name
        args = build_parser().parse_args([name])  # every path has a default (dvc.yaml passes them all)
        assert args.stage == name and args.metrics == f"metrics/{name}.json"


@pytest.mark.parametrize("case", ["missing params file", "missing input"])
def test_a_bad_run_is_exit_code_2_and_one_error_line(tmp_path, case):
    if case == "missing params file":
        params = tmp_path / "absent.yaml"
    else:
        params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(tmp_path / "absent")})
    result = subprocess.run([sys.executable, "-m", "spectralar", "prepare", "--params", str(params),
                             "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert " ERROR " in line and "absent" in line
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------------
# Layers, read from the source with ast (imports inside functions too; importlib calls are not seen)
# ---------------------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_project_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body, as absolute dotted names; ``from X import
    y`` counts X, and X.y when that is a spectralar module."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names
                         if _is_project_module(f"{source}.{alias.name}"))
    return found


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_the_import_scan_sees_every_form_of_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    stages = tmp_path / "spectralar/stages"
    stages.mkdir(parents=True)
    for name in ("__init__", "sample", "evaluate"):
        (stages / f"{name}.py").write_text("")
    (stages / "evaluate.py").write_text(
        "import os\nfrom spectralar.stages import STAGES\n"
        "def f():\n    from . import sample\n    from ..cli import main\n    import mlflow.entities\n")
    assert imported_modules(stages / "evaluate.py") == {
        "os", "spectralar.stages", "spectralar.stages.sample", "spectralar.cli", "mlflow.entities"}


def test_no_stage_module_imports_the_cli():
    assert _violations(sorted((PACKAGE / "stages").glob("*.py")), ("spectralar.cli",)) == {}


def test_library_code_imports_no_stage_cli_tracking_or_sweep():
    files = sorted(f for directory in LIBRARY for f in (PACKAGE / directory).rglob("*.py"))
    assert files
    forbidden = ("spectralar.stages", "spectralar.cli", "spectralar.tracking", "spectralar.sweep")
    assert _violations(files, forbidden) == {}


def test_only_tracking_imports_mlflow():
    files = [f for f in sorted(PACKAGE.rglob("*.py")) if "tracking" not in f.relative_to(PACKAGE).parts]
    assert _violations(files, ("mlflow",)) == {}


def test_no_stage_module_imports_another():
    """File contracts between stages live in spectralar.artifacts, shared stage code in
    stages/common.py; a stage imports no other stage (so it is rerun only when its own code changes)."""
    allowed = {"spectralar.stages", *(f"spectralar.stages.{name}" for name in STAGE_HELPERS)}
    found = {}
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.startswith("spectralar.stages.") and m not in allowed)
        if bad:
            found[path.name] = bad
    assert found == {}
