"""Where the record goes: the project root, the store's URI, its lock, and best-effort calls to it."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from spectralar.config import TrackingConfig
from spectralar.tracking.tags import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER,
)

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


def standard_tags(commit: str, source: str) -> dict[str, str]:
    """MLflow's user, source and code-version tags (the columns the UI shows), for a client-made run."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    tags = {MLFLOW_USER: user, MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "LOCAL"}
    sha = commit.removesuffix("-dirty")
    if sha != "unknown":
        tags[MLFLOW_GIT_COMMIT] = sha
    return tags


def command_line() -> str:
    """How this process was started, for ``mlflow.source.name`` (``python -m spectralar <stage>``)."""
    program = "python -m spectralar" if sys.argv and sys.argv[0].endswith(("spectralar/__main__.py", "-m")) \
        else os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    stage = next((a for a in sys.argv[1:2] if not a.startswith("-")), "")
    return f"{program} {stage}".strip()


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
        if db.exists() and not db.is_file():  # MLflow would retry opening it for ~100 s first
            raise IsADirectoryError(f"{db} is {'a folder' if db.is_dir() else 'not a regular file'}, "
                                    f"not an sqlite database: move it away or set tracking.uri")
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


ARTIFACTS_DIR = "mlartifacts"  # beside the sqlite store: <project>/mlartifacts


def artifact_root(db: Path) -> str:
    """The artifact location of a sqlite store's experiments: ``mlartifacts/`` beside the database."""
    return (db.resolve().parent / ARTIFACTS_DIR).as_uri()


def relocate_artifacts(db: Path, experiment_id: str, location: str) -> Optional[str]:
    """Point an experiment (and its runs and logged models) that a copied or moved project brought
    along at this project's ``mlartifacts/``; returns the old location, None when nothing moved.

    MLflow stores absolute artifact URIs (it resolves a relative location against the working
    directory) and has no API to change them, so a copy of the project would otherwise keep writing
    artifacts into the original, and show the original's files. Only a location this module made
    (one that ends in ``/mlartifacts``) is rewritten; a location someone chose is left alone.
    """
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        row = connection.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                                 (int(experiment_id),)).fetchone()
        old = row[0] if row else None
        if old is None or old == location or not old.startswith("file:") or not old.endswith("/" + ARTIFACTS_DIR):
            return None
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                           (location, int(experiment_id)))
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            try:
                connection.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                   f"WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                                   (location, len(old) + 1, int(experiment_id), len(old), old))
            except sqlite3.OperationalError:  # a table this MLflow version does not have
                pass
    return old


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if needed (artifacts beside a sqlite store, opening on its runs
    table in the UI), and moved to this project's ``mlartifacts/`` if the project was copied."""
    db = sqlite_path(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_root(db) if db else None)
    else:
        experiment_id = experiment.experiment_id
        if db is not None:
            old = relocate_artifacts(db, experiment_id, artifact_root(db))
            if old is not None:
                log.info("MLflow artifacts of experiment %s moved from %s to %s (a copied project)", name, old,
                         artifact_root(db))
    if experiment is None or experiment.tags.get(EXPERIMENT_KIND) is None:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING)
    return experiment_id


def next_number(client, experiment_id: str, filter_string: str) -> int:
    """1 + the number of runs that match, deleted ones included: a counter for unique run names."""
    from mlflow.entities import ViewType

    count, token = 0, None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=ViewType.ALL,
                                  max_results=1000, page_token=token)
        count += len(page)
        token = page.token
        if not token:
            return count + 1


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
