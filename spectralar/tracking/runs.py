"""Stage runs: one MLflow run per stage execution, a child of its pipeline run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from spectralar.config import TrackingConfig
from spectralar.tracking import calls
from spectralar.tracking.models import Example, log_torch_model
from spectralar.tracking.pipeline import Pipeline
from spectralar.tracking.store import Store, command_line, git_commit, next_number, standard_tags
from spectralar.tracking.tags import (
    PARAMS_HASH, PARENT_RUN_ENV, PARENT_RUN_ID, PIPELINE_KEY, PIPELINE_RUN_ID, RESTORED, ROLE, STAGE,
)


class StageRun:
    """One MLflow run for one stage execution, a child of the pipeline run. Use as a context manager.

    ``params_file`` (with ``pipeline_tags``) puts the run under the open pipeline run of that params
    file, creating it if needed; ``SPECTRALAR_PARENT_RUN_ID`` overrides that; with neither the run
    has no parent. All methods are no-ops once tracking is off or has failed; none of them raises.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        stage: str,
        *,
        params: Mapping[str, Any],
        params_hash: str,
        params_file: str | Path | None = None,
        pipeline_tags: Optional[Mapping[str, str]] = None,
        tags: Optional[Mapping[str, str]] = None,
        run_name: Optional[str] = None,
    ) -> None:
        self.cfg = cfg
        self.stage = stage
        self._store = Store(cfg, f"stage {stage}")
        self.uri = self._store.uri
        self._params = params
        commit = git_commit()
        self._tags = {
            ROLE: "stage",
            STAGE: stage,
            "spectralar.git_commit": commit,
            PARAMS_HASH: params_hash,
            RESTORED: "false",
            **standard_tags(commit, command_line()),
            **(tags or {}),
        }
        self._parent = os.environ.get(PARENT_RUN_ENV) or None
        self._pipeline = None
        if params_file is not None:
            self._pipeline = Pipeline.of(params_file, pipeline_tags, commit)
            self._tags[PIPELINE_KEY] = self._pipeline.key
        self._run_name = run_name
        self._curves: set[str] = set()  # keys logged with a step: their last point is the result
        self._client = None
        self.run_id: Optional[str] = None
        self.pipeline_run_id: Optional[str] = None

    @property
    def active(self) -> bool:
        return self._store.active

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        return self._store.call(what, fn, *args, **kwargs)

    def _start(self) -> None:
        experiment_id = self._store.connect()
        client = self._store.client
        parent = self._parent
        if parent is None and self._pipeline is not None:
            parent = self._pipeline.open(client, experiment_id)
        tags = dict(self._tags)
        if parent is not None:
            tags[PARENT_RUN_ID] = parent
            tags[PIPELINE_RUN_ID] = parent
        run = client.create_run(experiment_id, run_name=self._run_name or self._numbered_name(client, experiment_id),
                                tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        self.pipeline_run_id = parent
        calls.log_params(client, self.run_id, self._params)

    def _numbered_name(self, client, experiment_id: str) -> str:
        """``<stage> #<n> <params hash>``: unique in the experiment, and runs with the same params
        sections share the hash. Made under the store's lock, so parallel jobs never share a number."""
        number = next_number(client, experiment_id, f"tags.`{STAGE}` = '{self.stage}'")
        return stage_run_name(self.stage, number, self._tags[PARAMS_HASH])

    # -- public API ---------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        self._call("start run", self._start)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._client is not None:
            status = "FINISHED" if exc_type is None else "FAILED"
            self._call("end run", self._client.set_terminated, self.run_id, status)

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log numeric leaves of a (nested) dict; keys are flattened with dots."""
        if self._client is not None:
            if step is not None:
                self._curves.update(metrics)
            self._call("log metrics", calls.log_metrics, self._client, self.run_id, metrics, step)

    def log_results(self, results: Mapping[str, Any]) -> None:
        """A stage's results (its metrics file plus telemetry): numbers as metrics, lists of numbers
        as metrics over steps 1..n, constants (sizes, counts, settings) and text as params. A result
        that has a training curve in this run is that curve's last point and is not logged again."""
        if self._client is not None:
            self._call("log results", calls.log_results, self._client, self.run_id, results,
                       frozenset(self._curves))

    def log_model(self, name: str, model, inputs: Example, outputs: Example) -> Optional[str]:
        """Log a torch module as an MLflow model (``mlflow.pytorch``) with the signature of an example
        call ``inputs -> outputs`` that the caller made (a few items are enough). Returns its URI."""
        if self._client is None:
            return None
        return self._call(f"log model {name}", log_torch_model, self._client, self.uri, self.run_id, name, model,
                          inputs, outputs)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._client is not None:
            self._call("set tags", calls.set_tags, self._client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self._client is not None:
            self._call("log artifact", calls.log_path, self._client, self.run_id, path, artifact_path)


def stage_run_name(stage: str, number: int, params_hash: str) -> str:
    return f"{stage} #{number} {params_hash[:6]}"
