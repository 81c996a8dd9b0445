from __future__ import annotations

import argparse
import logging

from spectralar.cli import run_stage
from tests.conftest import write_params


def _prepare(tmp_path, fashion_dir):
    params = write_params(tmp_path / "params.yaml", {"data.fashion_mnist_dir": str(fashion_dir)})
    args = argparse.Namespace(params=str(params), metrics=str(tmp_path / "m.json"), out=str(tmp_path / "prepared"))
    return run_stage("prepare", args)


def test_stage_run_is_recorded(tmp_path, fashion_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPECTRALAR_PARENT_RUN_ID", "parent123")
    _prepare(tmp_path, fashion_dir)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("spectralar")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["spectralar.stage"] == "prepare"
    assert run.data.tags["mlflow.parentRunId"] == "parent123"
    assert len(run.data.tags["spectralar.params_hash"]) == 16
    assert "spectralar.git_commit" in run.data.tags
    assert run.data.params["data.resolution"] == "32"
    assert "tracking.uri" not in run.data.params  # only the sections the stage depends on
    assert run.data.params["images.train"] == "60"  # a size: a param, beside the config
    assert run.data.metrics["skipped"] == 0  # a result: a metric
    assert run.info.run_name == f"prepare #1 {run.data.tags['spectralar.params_hash'][:6]}"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "m.json"} <= artifacts


def test_tracking_failure_is_a_warning_not_a_lost_result(tmp_path, fashion_dir, monkeypatch, caplog):
    monkeypatch.setenv("SPECTRALAR_TRACKING", "1")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/sub/mlflow.db")
    logging.getLogger("spectralar").propagate = True
    with caplog.at_level(logging.WARNING, logger="spectralar.tracking"):
        metrics = _prepare(tmp_path, fashion_dir)
    assert metrics["images"]["train"] == 60
    assert (tmp_path / "m.json").is_file()
    assert any("MLflow tracking off" in r.message for r in caplog.records)
