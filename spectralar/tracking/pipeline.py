"""Pipeline runs: their identity (the key), finding or opening the one a stage joins, and the
report's ``finish_pipeline``, which records the stages that did not execute and closes the run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from spectralar.config import TrackingConfig
from spectralar.tracking.calls import log_params, log_path, log_results, set_tags
from spectralar.tracking.store import Store, command_line, git_commit, next_number, project_root, standard_tags
from spectralar.tracking.tags import (
    PARAMS_DIGEST, PARAMS_HASH, PARENT_RUN_ENV, PARENT_RUN_ID, PIPELINE_KEY, PIPELINE_RUN_ID, RESTORED, ROLE, STAGE,
)

log = logging.getLogger("spectralar.tracking")


def pipeline_key(params_file: str | Path, root: str | Path | None = None) -> str:
    """Identity of a pipeline: its project root and its params file (each ablation row has its own)."""
    root = Path(root) if root is not None else project_root()
    blob = f"{root}\0{os.path.abspath(params_file)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolved_params(params_file: str | Path) -> dict[str, Any]:
    """Every section of the params file as the stages read it (the strict loader's values, defaults
    filled in); empty when the file does not load (the stage itself reports that)."""
    from spectralar.config import load_params

    try:
        params = load_params(params_file)
    except Exception as err:  # noqa: BLE001 -- best effort: the pipeline run is still made
        log.warning("pipeline run without params: %s does not load (%s)", params_file, err)
        return {}
    return params.subset(tuple(params.sections))


def params_digest(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Pipeline:
    """What identifies and describes one pipeline run: key, tags, the resolved params and the run
    name's stem (``pipeline <params file>``; ``open`` numbers it)."""

    key: str
    tags: Mapping[str, str]
    run_name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, params_file: str | Path, extra_tags: Optional[Mapping[str, str]], commit: str) -> "Pipeline":
        root = project_root()
        workdir = Path.cwd()
        absolute = Path(os.path.abspath(params_file))
        shown = os.path.relpath(absolute, workdir) if workdir in absolute.parents else str(absolute)
        tags = {
            ROLE: "pipeline",
            PIPELINE_KEY: pipeline_key(absolute, root),
            "spectralar.params_file": shown,
            "spectralar.workdir": str(workdir),
            "spectralar.git_commit": commit,
            **standard_tags(commit, command_line()),
            **{k: str(v) for k, v in (extra_tags or {}).items()},
        }
        params = resolved_params(absolute)
        tags[PARAMS_DIGEST] = params_digest(params)
        return cls(tags[PIPELINE_KEY], tags, f"pipeline {shown}", params)

    def find_open(self, client, experiment_id: str) -> Optional[str]:
        runs = client.search_runs(
            [experiment_id],
            filter_string=(f"tags.`{ROLE}` = 'pipeline' and tags.`{PIPELINE_KEY}` = '{self.key}'"
                           " and attributes.status = 'RUNNING'"),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def open(self, client, experiment_id: str) -> str:
        """The open pipeline run of this key, created if there is none. Call under the lock."""
        run_id = self.find_open(client, experiment_id)
        if run_id is None:
            number = next_number(client, experiment_id,
                                 f"tags.`{ROLE}` = 'pipeline' and tags.`{PIPELINE_KEY}` = '{self.key}'")
            name = f"{self.run_name} #{number} {self.tags[PARAMS_DIGEST][:6]}"
            run_id = client.create_run(experiment_id, run_name=name, tags=dict(self.tags)).info.run_id
            log_params(client, run_id, self.params)  # flattened: train_generator.steps, ...
            log.info("MLflow pipeline run %s (%s)", run_id, name)
        return run_id


def _finished_stages(client, experiment_id: str, parent_id: str) -> set[tuple[str, str]]:
    """(stage, params_hash) of the FINISHED child runs of a pipeline run."""
    found: set[tuple[str, str]] = set()
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'FINISHED'",
            max_results=1000,
            page_token=token,
        )
        found.update((r.data.tags.get(STAGE, ""), r.data.tags.get(PARAMS_HASH, "")) for r in page)
        token = page.token
        if not token:
            return found


@dataclass(frozen=True)
class StageRecord:
    """What a stage left on disk, enough to record it in MLflow without running it: the params
    sections it depends on (and their hash, ``Params.digest``), the contents of its metrics file
    and the paths of its small outputs (files, or directories whose contents are logged)."""

    stage: str
    params: Mapping[str, Any]
    params_hash: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    artifacts: tuple[str, ...] = ()


def _restore(client, experiment_id: str, parent_id: str, pipeline_key_: str, commit: str,
             record: StageRecord) -> str:
    """A FINISHED child run for a stage that did not execute in this pipeline run."""
    tags = {
        ROLE: "stage",
        STAGE: record.stage,
        "spectralar.git_commit": commit,
        **standard_tags(commit, command_line()),
        PARAMS_HASH: record.params_hash,
        RESTORED: "true",
        PIPELINE_KEY: pipeline_key_,
        PARENT_RUN_ID: parent_id,
        PIPELINE_RUN_ID: parent_id,
    }
    number = next_number(client, experiment_id, f"tags.`{STAGE}` = '{record.stage}'")
    name = f"{record.stage} (restored) #{number} {record.params_hash[:6]}"
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    log_params(client, run_id, record.params)
    log_results(client, run_id, record.metrics)
    for path in record.artifacts:
        log_path(client, run_id, path)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def finish_pipeline(
    cfg: TrackingConfig,
    *,
    params_file: str | Path,
    stages: Sequence[StageRecord],
    artifacts: Sequence[str | Path | tuple[str | Path, str]] = (),
    metrics: Optional[Mapping[str, Any]] = None,
    tags: Optional[Mapping[str, str]] = None,
) -> Optional[str]:
    """Complete and close the pipeline run of ``params_file``; called by the report stage.

    Takes the open pipeline run of the params file's key (creates one when none is open, e.g. when
    every stage came from DVC's run cache). For every record in ``stages`` that has no FINISHED
    child with the same ``spectralar.stage`` and ``spectralar.params_hash``, adds a child tagged
    ``spectralar.restored=true`` with the record's params, metrics and artifacts. Then sets ``tags``
    (the pipeline tags, ``spectralar.stages.context.pipeline_tags``) on the pipeline run, logs the
    report's ``metrics`` and ``artifacts`` (paths, or ``(path, artifact_path)`` pairs) on it and ends
    it FINISHED. Calling it again makes a second, complete pipeline run.

    With ``SPECTRALAR_PARENT_RUN_ID`` set, that run is used instead and left open (its owner ends it).
    Returns the pipeline run's id, or None when tracking is off or failed (a warning, never raises).
    """
    store = Store(cfg, "the pipeline report")
    if not store.active:
        return None
    commit = git_commit()
    try:
        pipeline = Pipeline.of(params_file, tags, commit)
    except Exception as err:  # noqa: BLE001 -- best effort, like every call here
        log.warning("MLflow tracking off for the pipeline report: %s: %s", type(err).__name__, err)
        return None
    owner = os.environ.get(PARENT_RUN_ENV) or None

    def open_parent() -> tuple[str, str]:
        experiment_id = store.connect()
        return experiment_id, owner or pipeline.open(store.client, experiment_id)

    opened = store.call("open pipeline run", open_parent)
    if opened is None:
        return None
    experiment_id, parent_id = opened
    client = store.client
    done = store.call("list stage runs", _finished_stages, client, experiment_id, parent_id)
    restored = []
    for record in stages:
        if done is not None and (record.stage, record.params_hash) not in done:
            store.call(f"restore {record.stage}", _restore, client, experiment_id, parent_id,
                       pipeline.key, commit, record)
            restored.append(record.stage)
    report_tags = {**(pipeline.tags if owner is None else {}), "spectralar.restored_stages": ",".join(restored)}
    store.call("tag pipeline run", set_tags, client, parent_id, report_tags)
    store.call("log report results", log_results, client, parent_id, metrics or {})
    for item in artifacts:
        path, artifact_path = item if isinstance(item, tuple) else (item, None)
        store.call("log report artifact", log_path, client, parent_id, path, artifact_path)
    if owner is None:
        store.call("end pipeline run", client.set_terminated, parent_id, "FINISHED")
    if not store.active:
        return None
    log.info("MLflow pipeline run %s complete (%d stages restored: %s)", parent_id, len(restored),
             ", ".join(restored) or "none")
    return parent_id
