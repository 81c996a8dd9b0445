"""Where the record goes: the project root, the store's URI, its lock, and best-effort calls to it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from spectralar.config import TrackingConfig

log = logging.getLogger("spectralar.tracking")

# DVC sets DVC_ROOT for every stage command; for queued experiments it is the original repository
# (dvc/repo/experiments/queue/base.py: "point to the parent DVC repo root (and not an executor
# tempdir root)"), for a plain ``dvc repro`` the repository itself.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXPERIMENTS_DIR = (".dvc", "tmp", "exps")


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
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{root / uri[len('sqlite:///'):]}"


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


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (relative or absolute), None for any other store."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise this project's writers to one store: parallel Snakemake jobs race otherwise, on
    creating the sqlite DB and experiment and on creating the pipeline run. Not reentrant."""
    db = sqlite_path(uri)
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


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    db = sqlite_path(uri)
    location = (db.resolve().parent / "mlartifacts").as_uri() if db else None
    return client.create_experiment(name, artifact_location=location)


class Store:
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
            with store_lock(self.uri):
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
