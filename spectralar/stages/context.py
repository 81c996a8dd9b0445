"""What a stage runs with, and how a stage and its pipeline are described in the MLflow record.

``StageContext`` is what the CLI hands a stage's ``run``. ``pipeline_tags`` are the tags of a params
file's pipeline run (the CLI passes them with every stage run, the report stage when it closes the
run); ``stage_record`` describes a stage that did not execute from its metrics file, for the report
stage's ``spectralar.tracking.finish_pipeline``. Light: this module imports no stage module, no
torch and no mlflow, so the CLI and the report stage can both use it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from spectralar.config import Params
from spectralar.io import TEMPORARY_SUFFIX, read_json, remove_stale_temporaries, write_json
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


# ------------------------------------------------------------------------------------------------
# One writer per stage output, whichever tool started it
# ------------------------------------------------------------------------------------------------

LOCK_DIR = Path(".spectralar") / "locks"  # under the working directory (the project root), git-ignored
LOCK_HELD_ENV = "SPECTRALAR_STAGE_LOCK_HELD"  # set for the processes a lock holder starts (torchrun ranks)


class StageBusyError(RuntimeError):
    """Another live process is writing the same stage output."""


@contextlib.contextmanager
def stage_lock(stage: str, metrics_path: str | Path) -> Iterator[None]:
    """Hold the project-level lock of one stage output (keyed by its metrics file) while it runs.

    DVC and Snakemake share no lock, and a SIGKILLed ``dvc repro`` can leave its stage running: a
    second writer of the same output must not start beside it. The lock is an ``flock`` on a file
    under ``.spectralar/locks/``: the kernel releases it when the holder dies, so a crash never
    leaves a stale lock. A second writer is refused at once with the holder's pid. Processes the
    holder starts (torchrun ranks) inherit it through ``SPECTRALAR_STAGE_LOCK_HELD``.
    """
    if os.environ.get(LOCK_HELD_ENV):
        yield
        return
    key = hashlib.sha256(str(Path(metrics_path).resolve()).encode()).hexdigest()[:16]
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"{stage}-{key}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StageBusyError(f"stage {stage} ({metrics_path}) is already running in process {holder} "
                                 f"(lock {path}): wait for it to finish, or stop it, then rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        os.environ[LOCK_HELD_ENV] = "1"
        try:
            yield
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_stale_outputs(args: argparse.Namespace, log: logging.Logger) -> None:
    """Delete what killed runs of this stage left behind (call with the stage's lock held): the
    temporaries (``.<name>.*.tmp``) beside its output and metrics file, inside its output folder and
    inside its checkpoint folder. Resumable work (checkpoints, a ``.partial`` table) is kept."""
    removed: list[Path] = []
    for name in ("out", "metrics"):
        if getattr(args, name, None):
            removed += remove_stale_temporaries(getattr(args, name))
    for name in ("out", "checkpoints"):
        value = getattr(args, name, None)
        if value and Path(value).is_dir():
            for stale in Path(value).glob(f".*{TEMPORARY_SUFFIX}"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(stale)
    for path in removed:
        log.warning("removed %s, left behind by a killed run", path)
