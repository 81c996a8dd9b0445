"""Small MLflow calls on one run: params, metrics, tags, artifacts. All are made under the store's
lock, through ``Store.call``; mlflow is imported on first use."""

from __future__ import annotations

import logging
import re
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


# Leaves of a stage's metrics that describe the run rather than measure it: sizes, counts, settings
# and the paper's reference numbers. They are params in MLflow (searchable, shown beside the config),
# as are text values; everything else numeric is a metric.
CONSTANT = re.compile(
    r"(^|\.)(num_\w+|\w+_images|images(\.\w+)?|steps|trained_steps|parameters|peak_lr|world_size|workers|vocab"
    r"|levels|omegas|truncate|isc_splits|kid_subset_size|completion_prefix|seed|feature_dim|\w+_num_samples\.\w+)$"
    r"|^paper(_table1)?\.")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def split_results(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """(metrics, series, params) of a stage's results, keys flattened with dots: numbers are metrics,
    lists of numbers (one value per prefix length, ...) are series logged with steps 1, 2, ...;
    constants (``CONSTANT``) and text are params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = obj

    walk("", results)
    metrics, series, params = {}, {}, {}
    for key, value in sorted(flat.items()):
        values = [_number(v) for v in value] if isinstance(value, (list, tuple)) and value else None
        if CONSTANT.search(key) or (_number(value) is None and (values is None or None in values)):
            if value is not None:
                params[key] = str(value)[:6000]
        elif values is not None:
            series[key] = values
        else:
            metrics[key] = float(value)
    return metrics, series, params


def log_results(client, run_id: str, results: Mapping[str, Any], curves: frozenset[str] = frozenset()) -> None:
    """A stage's results: metrics (except those that already have a curve in this run: their last
    point is the result), series as metrics with steps 1..n, constants and text as params."""
    from mlflow.entities import Metric

    metrics, series, params = split_results(results)
    now = int(time.time() * 1000)
    values = [Metric(key, value, now, 0) for key, value in metrics.items() if key not in curves]
    values += [Metric(key, value, now, step) for key, points in series.items()
               for step, value in enumerate(points, start=1)]
    for start in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[start:start + 500])
    log_params(client, run_id, params)


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
