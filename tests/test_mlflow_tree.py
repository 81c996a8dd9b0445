"""The MLflow record of a pipeline: a pipeline run per params file with a child run per stage,
restored children for stages that did not execute, one parent from parallel jobs, the store of a
DVC experiment's temporary copy, and all of it read back through a real ``mlflow server``."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY, make_fashion_dir, write_params

EXPERIMENT = "spectralar"


def _runs(client, filter_string: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=1000)


def _children(client, parent_id: str) -> dict[str, object]:
    runs = _runs(client, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_stage = {r.data.tags["spectralar.stage"]: r for r in runs}
    assert len(by_stage) == len(runs), "a stage recorded twice under one pipeline run"
    return by_stage


def _tracking_env(monkeypatch, uri: str) -> None:
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SPECTRALAR_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty sqlite store to copy: creating one costs ~5 s of migrations."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _store(empty_store: Path, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory, empty_store):
    """An ablation row's pipeline: prepare and train_evalnet run through the CLI with tracking on,
    train_proxy "restored from the run cache" (metrics file and output, no execution), then the
    report's ``finish_pipeline`` twice."""
    from spectralar.cli import run_stage
    from spectralar.stages.context import pipeline_tags, stage_record
    from spectralar.config import load_params
    from spectralar.tracking import finish_pipeline

    root = tmp_path_factory.mktemp("tree")
    uri = _store(empty_store, root)
    fashion = make_fashion_dir(root / "fashion")
    (root / "runs/ablation/no_causal").mkdir(parents=True)
    params_file = write_params(root / "runs/ablation/no_causal/params.yaml", {
        **TINY, "data.fashion_mnist_dir": str(fashion), "tokenizer.causal_mask": False,
    })
    metrics = root / "metrics"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _tracking_env(monkeypatch, uri)
        run_stage("prepare", argparse.Namespace(
            params=str(params_file), metrics=str(metrics / "prepare.json"), out=str(root / "prepared")))
        run_stage("train_evalnet", argparse.Namespace(
            params=str(params_file), metrics=str(metrics / "train_evalnet.json"),
            data=str(root / "prepared"), out=str(root / "evalnet")))
        (metrics / "train_proxy.json").write_text(json.dumps({"recon": 0.5, "stage_seconds": 1.0}))
        (root / "proxy").mkdir()
        (root / "proxy/config.json").write_text("{}")
        (root / "report.md").write_text("# report\n")
        params = load_params(params_file)
        records = [
            stage_record("prepare", params, metrics_file=metrics / "prepare.json",
                         artifacts=[root / "prepared/manifest.json"]),
            stage_record("train_evalnet", params, metrics_file=metrics / "train_evalnet.json"),
            stage_record("train_proxy", params, metrics_file=metrics / "train_proxy.json",
                         artifacts=[root / "proxy"]),
        ]
        finish = dict(params_file=params_file, stages=records, artifacts=[(root / "report.md", "report")],
                      metrics={"fid": 12.5}, tags=pipeline_tags(params))
        first = finish_pipeline(params.tracking, **finish)
        second = finish_pipeline(params.tracking, **finish)
    return SimpleNamespace(root=root, uri=uri, params_file=params_file, first=first, second=second)


def test_stages_executed_are_children_of_one_pipeline_run(tree):
    from mlflow.tracking import MlflowClient
    from spectralar.tracking import pipeline_key

    client = MlflowClient(tracking_uri=tree.uri)
    executed = _runs(client, "tags.`spectralar.restored` = 'false'")
    assert sorted(r.data.tags["spectralar.stage"] for r in executed) == ["prepare", "train_evalnet"]
    for run in executed:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == tree.first
        assert run.data.tags["spectralar.pipeline_run_id"] == tree.first
        assert run.data.tags["spectralar.role"] == "stage"
    parent = client.get_run(tree.first)
    tags = parent.data.tags
    assert tags["spectralar.role"] == "pipeline"
    assert tags["spectralar.pipeline_key"] == pipeline_key(tree.params_file)
    assert tags["spectralar.params_file"] == str(tree.params_file)  # outside the working directory
    assert tags["spectralar.workdir"] == os.getcwd()
    assert tags["spectralar.git_commit"]
    assert tags["spectralar.ablation_row"] == "no_causal"
    assert tags["spectralar.switch.causal_mask"] == "false"
    assert tags["spectralar.switch.spectral_supervision"] == "true"
    assert tags["spectralar.switch.nonuniform_mapping"] == "true"


def test_finish_pipeline_restores_what_did_not_run_and_closes_the_pipeline_run(tree):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tree.uri)
    assert tree.first and tree.second and tree.first != tree.second
    children = _children(client, tree.first)
    assert set(children) == {"prepare", "train_evalnet", "train_proxy"}
    restored = children["train_proxy"]
    assert restored.data.tags["spectralar.restored"] == "true"
    assert restored.info.run_name == f"train_proxy (restored) #1 {restored.data.tags['spectralar.params_hash'][:6]}"
    assert restored.info.status == "FINISHED"
    assert restored.data.params["train_proxy.steps"] == "6"
    assert restored.data.metrics["recon"] == 0.5
    assert {a.path for a in client.list_artifacts(restored.info.run_id)} == {"config.json", "train_proxy.json"}
    parent = client.get_run(tree.first)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fid"] == 12.5
    assert parent.data.tags["spectralar.restored_stages"] == "train_proxy"
    assert {a.path for a in client.list_artifacts(tree.first, "report")} == {"report/report.md"}

    # The second call: a second pipeline run of the same key, complete on its own.
    second = client.get_run(tree.second)
    assert second.info.status == "FINISHED"
    assert second.data.tags["spectralar.pipeline_key"] == parent.data.tags["spectralar.pipeline_key"]
    again = _children(client, tree.second)
    assert set(again) == {"prepare", "train_evalnet", "train_proxy"}
    assert all(r.data.tags["spectralar.restored"] == "true" for r in again.values())
    assert again["prepare"].data.params["images.train"] == "60"
    assert {"manifest.json", "prepare.json"} <= {a.path for a in client.list_artifacts(again["prepare"].info.run_id)}
    pipelines = _runs(client, "tags.`spectralar.role` = 'pipeline'")
    assert sorted(r.info.run_id for r in pipelines) == sorted([tree.first, tree.second])


def test_a_crashed_pipeline_is_continued_by_its_rerun(tmp_path, empty_store, monkeypatch):
    from mlflow.tracking import MlflowClient
    from spectralar.config import TrackingConfig
    from spectralar.tracking import StageRun

    uri = _store(empty_store, tmp_path)
    _tracking_env(monkeypatch, uri)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")

    def stage(name: str) -> StageRun:
        return StageRun(TrackingConfig(), name, params={"s": {"k": 1}}, params_hash="0" * 16, params_file=params_file)

    with pytest.raises(RuntimeError):
        with stage("train_proxy") as crashed:
            raise RuntimeError("out of memory")
    with stage("train_proxy") as rerun:
        pass
    other = tmp_path / "other.yaml"
    other.write_text("{}\n")
    with StageRun(TrackingConfig(), "prepare", params={}, params_hash="1" * 16, params_file=other) as row:
        pass
    client = MlflowClient(tracking_uri=uri)
    assert crashed.pipeline_run_id and rerun.pipeline_run_id == crashed.pipeline_run_id
    assert client.get_run(crashed.run_id).info.status == "FAILED"
    assert client.get_run(crashed.pipeline_run_id).info.status == "RUNNING"  # open until the report
    assert row.pipeline_run_id not in (None, crashed.pipeline_run_id)  # another params file


def _start_stages_in_parallel(uri: str, params_files: list[str], index: int, barrier, results) -> None:
    """One Snakemake job: for each params file, start a stage run at the barrier, with the others."""
    os.environ.update(SPECTRALAR_TRACKING="1", MLFLOW_TRACKING_URI=uri)
    os.environ.pop("SPECTRALAR_PARENT_RUN_ID", None)
    from mlflow.tracking import MlflowClient
    from spectralar.config import TrackingConfig
    from spectralar.tracking import StageRun

    # Pay for the import and the store's start-up (~1 s, cached per process) before the barrier, so
    # that the runs' starts really overlap: without the lock this makes several pipeline runs.
    MlflowClient(tracking_uri=uri).search_experiments()
    for params_file in params_files:
        run = StageRun(TrackingConfig(), f"stage{index}", params={"i": index}, params_hash=f"{index:016d}",
                       params_file=params_file)
        barrier.wait(timeout=120)
        with run:
            results.put((params_file, run.run_id, run.pipeline_run_id))


def test_parallel_jobs_make_one_pipeline_run(tmp_path, empty_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = _store(empty_store, tmp_path)
    _tracking_env(monkeypatch, uri)
    # Round 1 on a store without the experiment (the jobs race to create it, too); round 2 on
    # another params file, where only the pipeline run is new.
    params_files = [str(tmp_path / "params.yaml"), str(tmp_path / "row.yaml")]
    for path in params_files:
        Path(path).write_text("{}\n")
    context = multiprocessing.get_context("spawn")
    jobs = 3  # two spawned processes and this one (which has mlflow imported already: saves a core)
    barrier, results = context.Barrier(jobs), context.Queue()
    processes = [context.Process(target=_start_stages_in_parallel, args=(uri, params_files, i, barrier, results))
                 for i in range(1, jobs)]
    for process in processes:
        process.start()
    _start_stages_in_parallel(uri, params_files, 0, barrier, results)
    reported = [results.get(timeout=120) for _ in range(jobs * len(params_files))]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    client = MlflowClient(tracking_uri=uri)
    for params_file in params_files:
        parents = {parent for path, _, parent in reported if path == params_file}
        assert len(parents) == 1 and None not in parents, reported
        (pipeline,) = _runs(client, "tags.`spectralar.role` = 'pipeline'"
                                    f" and tags.`spectralar.params_file` = '{params_file}'")
        assert pipeline.info.run_id in parents
        assert len(_children(client, pipeline.info.run_id)) == jobs


def test_project_root_of_a_dvc_experiment_copy(tmp_path):
    from spectralar.tracking import project_root

    project = tmp_path / "project"
    queued = project / ".dvc/tmp/exps/tmpa1b2c3"  # dvc exp run --queue / dvc queue start
    standalone = project / ".dvc/tmp/exps/standalone/tmpd4e5f6"  # dvc exp run --temp
    subdir = project / "stages"
    for directory in (queued, standalone, subdir):
        directory.mkdir(parents=True)
    assert project_root(queued, environ={}) == project
    assert project_root(standalone, environ={}) == project
    assert project_root(project, environ={}) == project
    assert project_root(subdir, environ={}) == subdir
    # DVC_ROOT (set by DVC for every stage, the original repository in experiments) wins ...
    assert project_root(queued, environ={"DVC_ROOT": str(project)}) == project
    assert project_root(subdir, environ={"DVC_ROOT": str(project)}) == project
    # ... unless it is stale: a directory that does not contain the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert project_root(subdir, environ={"DVC_ROOT": str(elsewhere)}) == subdir
    assert project_root(queued, environ={"DVC_ROOT": str(elsewhere)}) == project


def test_a_dvc_experiment_copy_records_into_the_project_store(tmp_path, empty_store, monkeypatch):
    from mlflow.tracking import MlflowClient
    from spectralar.config import TrackingConfig
    from spectralar.tracking import StageRun, pipeline_key, resolve_uri

    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/tmpa1b2c3"
    copy.mkdir(parents=True)
    uri = _store(empty_store, project)
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SPECTRALAR_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(copy)
    cfg = TrackingConfig()  # uri: sqlite:///mlflow.db
    assert resolve_uri(cfg) == uri
    assert resolve_uri(TrackingConfig(uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"
    (copy / "params.yaml").write_text("{}\n")
    (copy / "out.txt").write_text("result\n")
    with StageRun(cfg, "prepare", params={}, params_hash="0" * 16, params_file="params.yaml") as run:
        run.log_artifact("out.txt")
    assert not (copy / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    parent = client.get_run(run.pipeline_run_id).data.tags
    assert parent["spectralar.pipeline_key"] == pipeline_key(copy / "params.yaml", project)
    assert parent["spectralar.workdir"] == str(copy)
    assert parent["spectralar.params_file"] == "params.yaml"
    assert (project / "mlartifacts" / run.run_id / "artifacts/out.txt").read_text() == "result\n"


def test_sweep_row_and_switch_tags(tmp_path):
    from spectralar.stages.context import pipeline_tags, sweep_row
    from spectralar.config import load_params

    assert sweep_row("runs/ablation/no_causal/params.yaml") == ("ablation", "no_causal")
    assert sweep_row("/x/runs/depth/d2/params.yaml") == ("depth", "d2")
    assert sweep_row("runs/ablation/params.yaml") is None
    assert sweep_row("runs/ablation/row/other.yaml") is None
    assert sweep_row("params.yaml") is None
    params = load_params(write_params(tmp_path / "params.yaml", {"tokenizer.nonuniform_mapping": False}))
    assert pipeline_tags(params) == {
        "spectralar.switch.spectral_supervision": "true",
        "spectralar.switch.causal_mask": "true",
        "spectralar.switch.nonuniform_mapping": "false",
    }


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_the_record_through_mlflow_server(tree):
    """What ``mlflow ui`` shows: every stage's run with params, metrics and artifacts, and the tree."""
    from tests.mlflow_server import serve

    with serve(tree.uri, tree.root / "served-artifacts") as client:
        base = client.tracking_uri
        experiment = client.get_experiment_by_name(EXPERIMENT)
        pipelines = client.search_runs([experiment.experiment_id], "tags.`spectralar.role` = 'pipeline'")
        assert {r.info.run_id for r in pipelines} == {tree.first, tree.second}
        for parent_id in (tree.first, tree.second):
            children = _children(client, parent_id)
            assert set(children) == {"prepare", "train_evalnet", "train_proxy"}
            assert children["prepare"].data.params["data.resolution"] == "32"
            assert children["prepare"].data.params["images.train"] == "60"
            assert children["train_evalnet"].data.params["train_evalnet.epochs"] == "1"
            assert "val_accuracy" in children["train_evalnet"].data.metrics
            assert children["train_proxy"].data.metrics["recon"] == 0.5
            for stage, expected in (("prepare", "manifest.json"), ("train_evalnet", "train_evalnet.json"),
                                    ("train_proxy", "config.json")):
                run_id = children[stage].info.run_id
                # The listing and the download the UI makes, both served by the server.
                listing = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
                assert expected in {f["path"] for f in listing.get("files", [])}, (stage, listing)
                query = urllib.parse.urlencode({"path": expected, "run_uuid": run_id})
                assert _get(f"{base}/get-artifact?{query}")
        report = _get(f"{base}/get-artifact?{urllib.parse.urlencode({'path': 'report/report.md', 'run_uuid': tree.first})}")
        assert report == b"# report\n"
        assert client.get_run(tree.first).data.metrics["fid"] == 12.5
