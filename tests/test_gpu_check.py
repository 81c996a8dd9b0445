"""spectralar.gpu_check on the CPU in quick mode: every part recorded, CUDA-only parts skipped with the
reason, a part past its limit killed without losing the others, JSON and markdown written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spectralar import gpu_check
from spectralar.data.fashion_mnist import load_split
from tests.conftest import REPO, TINY, make_fashion_dir, write_params

@pytest.fixture(scope="module")
def quick_check(tmp_path_factory) -> tuple[dict, str, Path]:
    """One quick run through the command line on the CPU (`--device cpu`, also on a GPU machine), the
    pipeline cut after `prepare` to keep it short."""
    base = tmp_path_factory.mktemp("gpu_check")
    fashion = make_fashion_dir(base / "fashion")
    params = write_params(base / "tiny.yaml", {"data.fashion_mnist_dir": str(fashion), **TINY})
    out = base / "out"
    command = [sys.executable, "-m", "spectralar.gpu_check", "--out", str(out), "--quick", "--device", "cpu",
               "--pipeline-params",
               str(params), "--pipeline-until", "prepare"]
    repository_files = [REPO / "metrics" / "prepare.json", REPO / "data" / "prepared" / "manifest.json"]
    before = [_stamp(path) for path in repository_files]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / gpu_check.JSON_NAME).read_text())
    assert (finished.returncode == 0) == report["ok"], finished.stderr[-3000:]
    assert [_stamp(path) for path in repository_files] == before  # the pipeline ran in a copy
    return report, (out / gpu_check.MARKDOWN_NAME).read_text(), out


def _stamp(path: Path):
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None


def _parts(report: dict) -> dict[str, dict]:
    return {record["part"]: record for record in report["parts"]}


def test_every_part_runs_or_says_why_not(quick_check):
    report, _, out = quick_check
    parts = _parts(report)
    assert [r["part"] for r in report["parts"]] == list(gpu_check.PART_NAMES)
    failed = {name: (r["note"], r.get("tail", "")[-1500:]) for name, r in parts.items()
              if r["status"] not in ("ok", "skipped")}
    assert not failed, failed
    assert report["ok"] and report["meta"]["mode"] == "quick" and report["meta"]["device"] == "cpu"
    assert parts["cuda_tests"]["status"] == "skipped" and "CUDA" in parts["cuda_tests"]["note"]
    for name in ("tokenizer_training", "generator_training", "generator_sampling", "ddp", "pipeline",
                 "compiled_sampling"):
        assert parts[name]["status"] == "ok", name
        assert 0 < parts[name]["seconds"] <= parts[name]["limit_s"] + 5, name
        assert (out / "logs" / f"{name}.log").is_file() or name == "pipeline"


def test_benchmarks_report_rates_and_no_cpu_mfu(quick_check):
    parts = _parts(quick_check[0])
    tokenizer = parts["tokenizer_training"]["result"]
    assert tokenizer["train_images_per_second"] > 0 and tokenizer["mfu"] is None  # no peak FLOP/s for a CPU
    assert "fp32" in tokenizer["precision"]  # the check autocasts on CUDA only
    assert tokenizer["b64_matches_paper_config"], tokenizer["b64_differences"]  # the bench's B-64 is the paper's
    training = parts["generator_training"]["result"]
    assert training["tokens_per_second"] > 0 and training["mfu"] is None
    tokens_per_image = training["tokens_per_second"] / training["images_per_second"]
    assert tokens_per_image == pytest.approx(training["num_tokens"], rel=0.01)
    sampling = parts["generator_sampling"]["result"]
    assert sampling["images_per_second_kv_cache"] > 0 and sampling["images_per_second_no_cache"] > 0
    assert sampling["cfg_scale"] == gpu_check.CFG_SCALE
    compiled = parts["compiled_sampling"]["result"]
    assert compiled["images_per_second_compiled"] > 0 and compiled["compile_seconds"] > 0
    assert compiled["mode"] == "default (inductor)" and "images_per_second_no_cache" not in compiled
    # one trace serves every step: no graph break, no recompile (and no CUDA graph to skip on the CPU)
    assert (compiled["unique_graphs"], compiled["graph_breaks"], compiled["cudagraph_skips"]) == (1, 0, 0)


def test_ddp_step_uses_gloo_without_cuda_and_matches_the_plain_step(quick_check):
    ddp = _parts(quick_check[0])["ddp"]["result"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["nccl_version"] is None
    assert ddp["max_gradient_difference"] <= 1e-4 * ddp["largest_gradient"] and ddp["largest_gradient"] > 0


def test_pipeline_runs_the_dvc_commands_in_a_copy(quick_check):
    report, _, out = quick_check
    pipeline = _parts(report)["pipeline"]["result"]
    assert [s["stage"] for s in pipeline["stages"]] == ["prepare"] and pipeline["stages"][0]["returncode"] == 0
    assert pipeline["device"] == "cpu" and pipeline["total_seconds"] > 0
    assert "prepare.json" in pipeline["metrics_files"]
    assert (out / "logs" / "pipeline" / "prepare.log").is_file()
    assert pipeline["stages"][0]["timing"]["images_per_second"] > 0  # this run's metrics/prepare.timing.json


def test_the_copy_leaves_out_outputs_bytecode_and_earlier_timings(tmp_path):
    """A stage's timings in the table come from this run: a timing file of an earlier run in the project
    is not copied (a stage that fails before writing its own would otherwise show the old numbers)."""
    source = tmp_path / "project"
    for relative in ("params.yaml", "metrics/prepare.json", "metrics/prepare.timing.json", "models/tokenizer.pt",
                     "spectralar/models/gpt.py", "spectralar/models/__pycache__/gpt.cpython-311.pyc"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text("x")
    gpu_check.copy_project(source, tmp_path / "copy")
    copied = sorted(str(path.relative_to(tmp_path / "copy"))
                    for path in (tmp_path / "copy").rglob("*") if path.is_file())
    assert copied == ["metrics/prepare.json", "params.yaml", "spectralar/models/gpt.py"]


def test_markdown_has_a_row_per_part_with_its_status(quick_check):
    report, text, _ = quick_check
    assert "Quick mode" in text and "no number here is a benchmark" in text
    for part in gpu_check.PARTS:
        record = _parts(report)[part.name]
        rows = [line for line in text.splitlines() if line.startswith(f"| {part.title} |")]
        assert len(rows) == 1 and f"| {record['status']} |" in rows[0], part.name
    assert "no CUDA device" in text and "images/s with the KV cache" in text and "tokens/s" in text
    assert "| prepare |" in text  # the pipeline's stage table, with the stage's timing file
    assert next(line for line in text.splitlines() if line.startswith("| prepare |")).count("images_per_second ") == 1


def test_a_part_past_its_limit_is_killed_and_the_next_part_still_recorded(tmp_path):
    options = gpu_check.Options(out=tmp_path, quick=True, device="cpu", parts=("generator_sampling", "pipeline"),
                                limits={"generator_sampling": 0.3})
    report = gpu_check.run_check(options)
    parts = _parts(report)
    assert parts["generator_sampling"]["status"] == "timeout" and "limit" in parts["generator_sampling"]["note"]
    assert parts["pipeline"]["status"] == "skipped"  # quick mode without a tiny params file
    assert not report["ok"]
    written = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert [r["status"] for r in written["parts"]] == ["timeout", "skipped"]
    assert "| timeout |" in (tmp_path / gpu_check.MARKDOWN_NAME).read_text()


def test_the_time_limit_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child_survived"
    script = f"import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 2; touch {marker}']); time.sleep(30)"
    begin = time.perf_counter()
    finished = gpu_check.run_limited([sys.executable, "-c", script], 1.0, cwd=tmp_path)
    assert finished.returncode is None and time.perf_counter() - begin < 10
    time.sleep(2.5)
    assert not marker.exists()  # the grandchild died with its group


def test_junit_counts(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad"><failure message="boom"/></testcase>
      <testcase classname="tests.test_b" name="test_skip"><skipped message="needs CUDA"/></testcase>
      <testcase classname="tests.test_b" name="test_err"><error message="fixture"/></testcase>
    </testsuite></testsuites>""")
    assert gpu_check.junit_counts(report) == {
        "passed": 1, "failed": 2, "skipped": 1, "failing": ["tests.test_a::test_bad", "tests.test_b::test_err"]}


def test_synthetic_fashion_mnist_reads_like_the_real_files(tmp_path):
    directory = gpu_check.synthetic_fashion_mnist(tmp_path / "fashion", train=30, val=20)
    images, labels = load_split(directory, "train", 32)
    assert images.shape == (30, 32, 32, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(30)]
    assert load_split(directory, "val", 32)[0].shape == (20, 32, 32, 1)


def test_a_missing_package_stops_the_check_before_any_part_and_names_its_pin(tmp_path, monkeypatch):
    """A GPU machine with a PyTorch of its own may lack the project's pins: the check names them at once
    (here torch-fidelity, which the pipeline's evaluate imports), instead of a part failing minutes in."""
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch_fidelity" else real(name, *args))
    pins = gpu_check.pinned_versions()
    assert gpu_check.missing_modules(("pipeline",)) == {"torch_fidelity": f"torch-fidelity=={pins['torch-fidelity']}"}
    assert gpu_check.missing_modules(("ddp", "generator_sampling")) == {}  # torch alone
    with pytest.raises(SystemExit, match=f"torch-fidelity=={pins['torch-fidelity']}"):
        gpu_check.run_check(gpu_check.Options(out=tmp_path / "out", quick=True, device="cpu"))
    assert not (tmp_path / "out").exists()  # no part started


_BLOCKER = """import sys


class _Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked for this test")


sys.meta_path.insert(0, _Unimportable())
"""


def test_the_model_parts_run_with_only_the_packages_they_list(tmp_path):
    """PART_NEEDS is all the model parts import beyond torch, numpy and PyYAML: with every other package
    of requirements.txt unimportable (a sitecustomize the parts' processes inherit) they still run. The
    tokenizer's part needs scipy alone: its ViT blocks are the project's own, not timm's."""
    parts = ("tokenizer_training", "generator_training", "generator_sampling", "ddp")
    listed = {module for part in parts for module in gpu_check.PART_NEEDS.get(part, {})}
    every = {module for needs in gpu_check.PART_NEEDS.values() for module in needs} | {"timm", "mlflow"}
    blocked = sorted(every - listed)
    assert "timm" in blocked and "torchvision" in blocked and "torch_fidelity" in blocked
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=blocked))
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked for this test" in probe.stderr  # the blocker is in force
    result = subprocess.run([sys.executable, "-m", "spectralar.gpu_check", "--quick", "--device", "cpu",
                             "--out", str(tmp_path / "out"), "--parts", ",".join(parts)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / gpu_check.JSON_NAME).read_text())
    assert {record["part"]: record["status"] for record in report["parts"]} == dict.fromkeys(parts, "ok"), \
        result.stdout[-3000:] + result.stderr[-3000:]


def test_the_report_gives_installed_and_pinned_versions(tmp_path):
    report = gpu_check.run_check(gpu_check.Options(out=tmp_path, quick=True, device="cpu", parts=("cuda_tests",)))
    packages = report["meta"]["packages"]
    assert packages["torch"]["pinned"] == gpu_check.pinned_versions()["torch"]
    assert packages["torch-fidelity"]["installed"] is not None and "mlflow" in packages
    line = next(line for line in (tmp_path / gpu_check.MARKDOWN_NAME).read_text().splitlines()
                if line.startswith("- packages: "))
    assert line.startswith("- packages: torch ") and "torch-fidelity " in line
    assert gpu_check._package_line({"torch": {"installed": "2.11.0+cu130", "pinned": "2.14.1"},
                                    "mlflow": {"installed": None, "pinned": "3.17.2"}}) == \
        "torch 2.11.0+cu130 (pinned 2.14.1), mlflow missing (stages run untracked)"


@pytest.mark.parametrize("venv,expected", [("/nonexistent-venv", "python3"), (".venv", ".venv/bin/python")])
def test_make_gpu_check_uses_the_venv_or_else_python3(venv, expected):
    """A GPU machine without network has no `make setup` and no .venv: the target falls back to python3.
    Run under `make test`, the inner make would inherit MAKELEVEL and MAKEFLAGS and print its directory."""
    env = {key: value for key, value in os.environ.items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    planned = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", f"VENV={venv}"], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True).stdout
    if venv == ".venv" and not (REPO / ".venv" / "bin" / "python").exists():
        expected = "python3"
    assert planned.strip().splitlines()[-1] == f"{expected} -m spectralar.gpu_check --out runs/gpu_check"
