"""What a stage runs with, and how a stage and its pipeline are described in the MLflow record.

``StageContext`` is what the CLI hands a stage's ``run``. ``pipeline_tags`` are the tags of a params
file's pipeline run (the CLI passes them with every stage run, the report stage when it closes the
run); ``stage_record`` describes a stage that did not execute from its metrics file, for the report
stage's ``spectralar.tracking.finish_pipeline``. Light: this module imports no stage module, no
torch and no mlflow, so the CLI and the report stage can both use it.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from spectralar.config import Params
from spectralar.io import read_json, write_json
from spectralar.stages import stage_info

if TYPE_CHECKING:
    from spectralar.tracking import StageRecord


@dataclass
class StageContext:
    """What a stage's ``run`` gets: typed params, parsed paths, a tracker and a logger."""

    name: str
    params: Params
    args: argparse.Namespace
    sections: tuple[str, ...]
    tracker: Any
    log: logging.Logger

    def log_outputs(self, directory: str | Path, names: Sequence[str], checkpoints: Sequence[str] = ()) -> None:
        """Log a stage's small outputs (those that exist) as MLflow artifacts, and its model files too
        when ``tracking.log_checkpoints`` is on."""
        wanted = [*names, *(checkpoints if self.params.tracking.log_checkpoints else ())]
        for name in wanted:
            if (Path(directory) / name).exists():
                self.tracker.log_artifact(Path(directory) / name)

    def write_config(self, directory: str | Path, **derived: Any) -> None:
        """The resolved config beside a stage's outputs (sections used + derived values)."""
        write_json(Path(directory) / "config.json", {
            "stage": self.name,
            "params_file": self.params.path,
            "params": self.params.subset(self.sections),
            "derived": derived,
        })


# Table 4's switches, tagged on every pipeline run so ablation rows can be told apart in MLflow.
TABLE4_SWITCHES = ("spectral_supervision", "causal_mask", "nonuniform_mapping")


def sweep_row(params_file: str | Path) -> Optional[tuple[str, str]]:
    """``(sweep, row)`` when the params file is a sweep row's, ``runs/<sweep>/<row>/params.yaml``."""
    from spectralar.sweep import PARAMS_FILE, SWEEP_ROOT

    parts = Path(params_file).parts
    if len(parts) >= 4 and parts[-4] == SWEEP_ROOT and parts[-1] == PARAMS_FILE:
        return parts[-3], parts[-2]
    return None


def pipeline_tags(params: Params) -> dict[str, str]:
    """Tags of the MLflow pipeline run of a params file: the Table 4 switches, and the sweep row
    (a Snakemake row's params file, or the DVC experiment named <sweep>-<row> that runs it)."""
    tags = {f"spectralar.switch.{name}": str(getattr(params.tokenizer, name)).lower() for name in TABLE4_SWITCHES}
    row = sweep_row(params.path)
    if row is not None:
        tags["spectralar.sweep"], tags["spectralar.sweep_row"] = row
        if row[0] == "ablation":
            tags["spectralar.ablation_row"] = row[1]
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:  # set by `dvc exp run` for every stage of an experiment
        tags["spectralar.dvc_experiment"] = experiment
    return tags


def stage_record(name: str, params: Params, *, metrics_file: str | Path | None = None,
                 artifacts: Sequence[str | Path] = ()) -> StageRecord:
    """What ``spectralar.tracking.finish_pipeline`` needs to record stage ``name`` without running
    it: the params sections it depends on (as the CLI's ``run_stage`` logs them), its metrics file
    (default ``metrics/<name>.json``; raises FileNotFoundError if missing), and ``artifacts``
    (paths) plus the metrics file as artifacts."""
    from spectralar.tracking import StageRecord

    sections = stage_info(name).sections
    metrics_path = Path(metrics_file if metrics_file is not None else f"metrics/{name}.json")
    metrics = read_json(metrics_path)
    return StageRecord(name, params.subset(sections), params.digest(sections), metrics,
                       tuple(str(p) for p in (*artifacts, metrics_path)))
