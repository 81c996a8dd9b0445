"""Small MLflow calls on one run: params, metrics, tags, artifacts. All are made under the store's
lock, through ``Store.call``; mlflow is imported on first use."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger("spectralar.tracking")


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:6000]


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
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


def log_metrics(client, run_id: str, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
    values = _metric_batch(metrics, step)
    for start in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[start:start + 500])


def log_path(client, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
    """A file, or a directory's contents, as artifacts; a missing path is a warning."""
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        log.warning("artifact %s does not exist; not logged", path)


def set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
