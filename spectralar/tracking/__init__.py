"""MLflow tracking. The only module that imports mlflow.

Each stage run is one MLflow run in one experiment, carrying the params sections the stage used,
its metrics, its small outputs as artifacts, and tags (stage, git commit, params hash). Tracking is
best effort: a failure (locked or unwritable DB, mlflow missing) is logged as a warning once and
tracking switches off for the rest of the stage. The metrics JSON files under ``metrics/`` are the
source of truth; MLflow is the place to look at them.

Environment overrides (handy for tests and clusters):
  SPECTRALAR_TRACKING=0          switch tracking off
  MLFLOW_TRACKING_URI            store to use instead of ``tracking.uri``
  SPECTRALAR_PARENT_RUN_ID       make the stage run a child of this run (pipeline tree)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from spectralar.config import TrackingConfig

log = logging.getLogger("spectralar.tracking")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:6000]


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


def resolve_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


def tracking_enabled(cfg: TrackingConfig) -> bool:
    return cfg.enabled and os.environ.get("SPECTRALAR_TRACKING", "1") not in ("0", "false", "off")


def _sqlite_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


class StageRun:
    """One MLflow run for one stage execution. Use as a context manager.

    All methods are no-ops once tracking is off or has failed; none of them raises.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        stage: str,
        *,
        params: Mapping[str, Any],
        params_hash: str,
        tags: Optional[Mapping[str, str]] = None,
        run_name: Optional[str] = None,
    ) -> None:
        self.cfg = cfg
        self.stage = stage
        self.uri = resolve_uri(cfg)
        self.active = tracking_enabled(cfg)
        self._params = params
        self._tags = {
            "spectralar.stage": stage,
            "spectralar.git_commit": git_commit(),
            "spectralar.params_hash": params_hash,
            **(tags or {}),
        }
        parent = os.environ.get("SPECTRALAR_PARENT_RUN_ID")
        if parent:
            self._tags["mlflow.parentRunId"] = parent
        self._run_name = run_name or stage
        self._client = None
        self.run_id: Optional[str] = None

    # -- plumbing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers to one sqlite store (parallel Snakemake jobs race otherwise)."""
        db = _sqlite_path(self.uri)
        if db is None:
            yield
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{db}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            with self._lock():
                return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- tracking must never cost a pipeline result
            log.warning("MLflow tracking off for stage %s: %s failed (%s: %s)", self.stage, what,
                        type(err).__name__, err)
            self.active = False
            return None

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            db = _sqlite_path(self.uri)
            location = (db.resolve().parent / "mlartifacts").as_uri() if db else None
            experiment_id = client.create_experiment(self.cfg.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        self._client = client
        self.run_id = run.info.run_id
        flat: dict[str, str] = {}
        _flatten("", self._params, flat)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[start:start + 100])

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
        if self._client is None:
            return
        flat: dict[str, str] = {}
        _flatten("", metrics, flat)
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        values = []
        for key, raw in sorted(flat.items()):
            try:
                value = float(raw)
            except ValueError:
                continue
            values.append(Metric(key, value, now, step or 0))
        for start in range(0, len(values), 500):
            self._call("log metrics", self._client.log_batch, self.run_id, metrics=values[start:start + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._client is None:
            return
        for key, value in tags.items():
            self._call("set tag", self._client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self._client is None:
            return
        path = Path(path)
        if path.is_dir():
            self._call("log artifacts", self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._call("log artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)
        else:
            log.warning("artifact %s does not exist; not logged", path)
