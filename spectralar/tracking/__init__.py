"""MLflow tracking. The only module that imports mlflow.

The record is a tree in one experiment (``tracking.experiment``), which ``mlflow ui`` shows nested:

  pipeline run   tags spectralar.role=pipeline, .pipeline_key, .params_file, .workdir, .git_commit,
  │              plus the CLI's pipeline tags (Table 4 switches, ablation row); the report's
  │              metrics and artifacts
  ├─ stage run   one per stage execution: tags spectralar.role=stage, .stage, .params_hash,
  │              .git_commit, .pipeline_run_id, mlflow.parentRunId; the params sections the stage
  │              used, its metrics, its small outputs as artifacts
  └─ stage run   spectralar.restored=true, named "<stage> (restored)": written by the report stage
                 for a stage that did not execute (restored from DVC's run cache, or reused by a
                 sweep row) from its metrics file, so the record of the pipeline is complete anyway

Pipeline runs. A pipeline is identified by its *key*, a hash of the project root and the absolute
params file path, so each params file (each ablation row) gets its own pipeline runs. A stage joins
the *open* (RUNNING) pipeline run of its key, or creates one; the report stage calls
``finish_pipeline``, which adds the restored stage runs and ends the pipeline run. A pipeline run
therefore spans from the first stage executed after the last completed report to the next report:
a crashed pipeline that is rerun continues the same pipeline run, and a stage rerun alone (without
the report) joins it too. Finding or creating the pipeline run happens under the store's lock, so
parallel Snakemake jobs make exactly one.

Stores. A relative ``sqlite:///`` path is relative to the *project root*, which is the working
directory except inside DVC's queued experiments (``dvc exp run --queue``/``--temp``, ``dvc queue
start``): those run the stages in a temporary copy under ``<root>/.dvc/tmp/exps/``, and the record
must land in ``<root>/mlflow.db`` (artifacts in ``<root>/mlartifacts``), not in the copy that is
deleted afterwards. See ``project_root``.

Tracking is best effort: a failure (locked or unwritable store, mlflow missing) is logged as a
warning once and tracking switches off for the rest of the stage; nothing here raises. The metrics
JSON files under ``metrics/`` are the source of truth; MLflow is the place to look at them.

Environment overrides (handy for tests and clusters):
  SPECTRALAR_TRACKING=0          switch tracking off
  MLFLOW_TRACKING_URI            store to use instead of ``tracking.uri``
  SPECTRALAR_PARENT_RUN_ID       use this run as the pipeline run instead of the open one of the key
                                 (its owner ends it: ``finish_pipeline`` adds to it but leaves it open)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from spectralar.config import TrackingConfig

log = logging.getLogger("spectralar.tracking")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_RUN_ENV = "SPECTRALAR_PARENT_RUN_ID"
# DVC sets DVC_ROOT for every stage command; for queued experiments it is the original repository
# (dvc/repo/experiments/queue/base.py: "point to the parent DVC repo root (and not an executor
# tempdir root)"), for a plain ``dvc repro`` the repository itself.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXPERIMENTS_DIR = (".dvc", "tmp", "exps")

ROLE = "spectralar.role"
STAGE = "spectralar.stage"
PARAMS_HASH = "spectralar.params_hash"
PIPELINE_KEY = "spectralar.pipeline_key"
PIPELINE_RUN_ID = "spectralar.pipeline_run_id"
RESTORED = "spectralar.restored"
PARENT_RUN_ID = "mlflow.parentRunId"  # what makes the MLflow UI nest runs


# --------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------

def project_root(cwd: str | Path | None = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The repository the record belongs to: ``cwd`` (default: the working directory), except in a
    DVC experiment's temporary copy, where it is the original repository.

    ``DVC_ROOT`` is used when it is a directory that contains ``cwd`` (it may be inherited stale
    from an unrelated process otherwise); without it, a ``.dvc/tmp/exps`` path component marks the
    copy and the path before it is the root.
    """
    environ = os.environ if environ is None else environ
    here = Path(os.path.abspath(cwd if cwd is not None else os.getcwd()))
    dvc_root = environ.get(DVC_ROOT_ENV)
    if dvc_root and os.path.isdir(dvc_root):
        root = Path(os.path.realpath(dvc_root))
        real_here = Path(os.path.realpath(here))
        if real_here == root or root in real_here.parents:
            return root
    parts = here.parts
    width = len(DVC_EXPERIMENTS_DIR)
    for i in range(1, len(parts) - width + 1):
        if parts[i:i + width] == DVC_EXPERIMENTS_DIR:
            return Path(*parts[:i])
    return here


def resolve_uri(cfg: TrackingConfig, root: str | Path | None = None) -> str:
    """The store URI: ``MLFLOW_TRACKING_URI`` or ``tracking.uri``, a relative sqlite path made
    absolute against ``root`` (default: ``project_root()``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{root / uri[len('sqlite:///'):]}"


def pipeline_key(params_file: str | Path, root: str | Path | None = None) -> str:
    """Identity of a pipeline: its project root and its params file (each ablation row has its own)."""
    root = Path(root) if root is not None else project_root()
    blob = f"{root}\0{os.path.abspath(params_file)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tracking_enabled(cfg: TrackingConfig) -> bool:
    return cfg.enabled and os.environ.get("SPECTRALAR_TRACKING", "1") not in ("0", "false", "off")


def git_commit(cwd: str | Path = ".") -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return f"{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sqlite_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise this project's writers to one store: parallel Snakemake jobs race otherwise, on
    creating the sqlite DB and experiment and on creating the pipeline run. Not reentrant."""
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = f"{db}.lock"
    else:  # a server: still one pipeline run from the parallel jobs of one machine
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        lock_path = os.path.join(tempfile.gettempdir(), f"spectralar-mlflow-{digest}.lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Small MLflow helpers (all called under the lock, through _Store.call)
# --------------------------------------------------------------------------------------------

def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:6000]


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat: dict[str, str] = {}
    _flatten("", params, flat)
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def _metric_batch(metrics: Mapping[str, Any], step: Optional[int] = None) -> list:
    """Numeric leaves of a (nested) dict as MLflow metrics; keys are flattened with dots."""
    from mlflow.entities import Metric

    flat: dict[str, str] = {}
    _flatten("", metrics, flat)
    now = int(time.time() * 1000)
    values = []
    for key, raw in sorted(flat.items()):
        try:
            value = float(raw)
        except ValueError:
            continue
        values.append(Metric(key, value, now, step or 0))
    return values


def _log_metrics(client, run_id: str, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
    values = _metric_batch(metrics, step)
    for start in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[start:start + 500])


def _log_path(client, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
    """A file, or a directory's contents, as artifacts; a missing path is a warning."""
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        log.warning("artifact %s does not exist; not logged", path)


def _set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = _sqlite_path(uri)
    location = (db.resolve().parent / "mlartifacts").as_uri() if db else None
    return client.create_experiment(name, artifact_location=location)


class _Store:
    """One store: a client, the lock, and best-effort calls (the first failure switches it off)."""

    def __init__(self, cfg: TrackingConfig, what: str) -> None:
        self.cfg = cfg
        self.what = what
        self.uri = resolve_uri(cfg)
        self.active = tracking_enabled(cfg)
        self.client = None

    def call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            with _store_lock(self.uri):
                return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- tracking must never cost a pipeline result
            log.warning("MLflow tracking off for %s: %s failed (%s: %s)", self.what, what,
                        type(err).__name__, err)
            self.active = False
            return None

    def connect(self) -> str:
        """Open the client, create the DB and experiment if needed; returns the experiment id."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = _experiment_id(client, self.cfg.experiment, self.uri)
        self.client = client
        return experiment_id


# --------------------------------------------------------------------------------------------
# Pipeline runs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pipeline:
    """What identifies and describes one pipeline run: key, tags and run name."""

    key: str
    tags: Mapping[str, str]
    run_name: str

    @classmethod
    def of(cls, params_file: str | Path, extra_tags: Optional[Mapping[str, str]], commit: str) -> "_Pipeline":
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
            **{k: str(v) for k, v in (extra_tags or {}).items()},
        }
        return cls(tags[PIPELINE_KEY], tags, f"pipeline {shown}")

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
            run_id = client.create_run(experiment_id, run_name=self.run_name, tags=dict(self.tags)).info.run_id
            log.info("MLflow pipeline run %s (%s)", run_id, self.run_name)
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


# --------------------------------------------------------------------------------------------
# Stage runs
# --------------------------------------------------------------------------------------------

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
        self._store = _Store(cfg, f"stage {stage}")
        self.uri = self._store.uri
        self._params = params
        commit = git_commit()
        self._tags = {
            ROLE: "stage",
            STAGE: stage,
            "spectralar.git_commit": commit,
            PARAMS_HASH: params_hash,
            RESTORED: "false",
            **(tags or {}),
        }
        self._parent = os.environ.get(PARENT_RUN_ENV) or None
        self._pipeline = None
        if params_file is not None:
            self._pipeline = _Pipeline.of(params_file, pipeline_tags, commit)
            self._tags[PIPELINE_KEY] = self._pipeline.key
        self._run_name = run_name or stage
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
        run = client.create_run(experiment_id, run_name=self._run_name, tags=tags)
        self._client = client
        self.run_id = run.info.run_id
        self.pipeline_run_id = parent
        _log_params(client, self.run_id, self._params)

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
            self._call("log metrics", _log_metrics, self._client, self.run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._client is not None:
            self._call("set tags", _set_tags, self._client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self._client is not None:
            self._call("log artifact", _log_path, self._client, self.run_id, path, artifact_path)


# --------------------------------------------------------------------------------------------
# The report stage: complete and close the pipeline record
# --------------------------------------------------------------------------------------------

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
        PARAMS_HASH: record.params_hash,
        RESTORED: "true",
        PIPELINE_KEY: pipeline_key_,
        PARENT_RUN_ID: parent_id,
        PIPELINE_RUN_ID: parent_id,
    }
    run_id = client.create_run(experiment_id, run_name=f"{record.stage} (restored)", tags=tags).info.run_id
    _log_params(client, run_id, record.params)
    _log_metrics(client, run_id, record.metrics)
    for path in record.artifacts:
        _log_path(client, run_id, path)
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
    (the CLI's pipeline tags) on the pipeline run, logs the report's ``metrics`` and ``artifacts``
    (paths, or ``(path, artifact_path)`` pairs) on it and ends it FINISHED. Calling it again makes a second, complete pipeline run.

    With ``SPECTRALAR_PARENT_RUN_ID`` set, that run is used instead and left open (its owner ends it).
    Returns the pipeline run's id, or None when tracking is off or failed (a warning, never raises).
    """
    store = _Store(cfg, "the pipeline report")
    if not store.active:
        return None
    commit = git_commit()
    try:
        pipeline = _Pipeline.of(params_file, tags, commit)
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
    store.call("tag pipeline run", _set_tags, client, parent_id, report_tags)
    store.call("log report metrics", _log_metrics, client, parent_id, metrics or {})
    for item in artifacts:
        path, artifact_path = item if isinstance(item, tuple) else (item, None)
        store.call("log report artifact", _log_path, client, parent_id, path, artifact_path)
    if owner is None:
        store.call("end pipeline run", client.set_terminated, parent_id, "FINISHED")
    if not store.active:
        return None
    log.info("MLflow pipeline run %s complete (%d stages restored: %s)", parent_id, len(restored),
             ", ".join(restored) or "none")
    return parent_id
