"""MLflow tracking. The only module that imports mlflow.

The record is a tree in one experiment (``tracking.experiment``), which ``mlflow ui`` shows nested:

  pipeline run   tags spectralar.role=pipeline, .pipeline_key, .params_file, .workdir, .git_commit,
  │              plus the pipeline tags (Table 4 switches, sweep row); the report's
  │              metrics and artifacts
  ├─ stage run   one per stage execution: tags spectralar.role=stage, .stage, .params_hash,
  │              .git_commit, .pipeline_run_id, mlflow.parentRunId; the params sections the stage
  │              used, its metrics, its small outputs as artifacts
  └─ stage run   spectralar.restored=true, named "<stage> (restored)": written by the report stage
                 for a stage that did not execute (restored from DVC's run cache, or reused by a
                 sweep row) from its metrics file, so the record of the pipeline is complete anyway

Names, params and tags. Runs are named ``<stage> #<n> <params hash>`` and ``pipeline <params file> #<n>
<params digest>`` (n counts the runs of that stage, or of that pipeline key, so names never repeat);
the pipeline run holds every resolved param of its params file, flattened (``train_generator.steps``).
Every run carries MLflow's own ``mlflow.user``, ``mlflow.source.name``/``.type`` and
``mlflow.source.git.commit``. A stage's results (``StageRun.log_results``) are metrics, lists of numbers
are metrics over steps 1..n (PSNR per prefix length), and constants (sizes, counts, settings, the paper's
numbers) and text are params; a result with a training curve (``train_loss``) is that curve's last point.
``StageRun.log_model`` logs a torch module as an MLflow model (``mlflow.pytorch``, with a signature).

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
deleted afterwards. See ``project_root``.  Artifacts live in ``mlartifacts/`` beside the sqlite store; a copied or moved
project (its ``mlflow.db`` says the artifacts are elsewhere) is pointed at its own ``mlartifacts/`` on the
next connection (``store.relocate_artifacts``), so a copy never writes into the original.

Tracking is best effort: a failure (locked or unwritable store, mlflow missing) is logged as a
warning once and tracking switches off for the rest of the stage; nothing here raises. The metrics
JSON files under ``metrics/`` are the source of truth; MLflow is the place to look at them.

Environment overrides (handy for tests and clusters):
  SPECTRALAR_TRACKING=0          switch tracking off
  MLFLOW_TRACKING_URI            store to use instead of ``tracking.uri``
  SPECTRALAR_PARENT_RUN_ID       use this run as the pipeline run instead of the open one of the key
                                 (its owner ends it: ``finish_pipeline`` adds to it but leaves it open)

Modules: ``store`` (project root, store URI, lock, best-effort calls), ``calls`` (params, metrics,
tags and artifacts of one run), ``tags`` (the tree's tag names), ``models`` (MLflow models), ``pipeline`` (pipeline runs,
``StageRecord``, ``finish_pipeline``), ``runs`` (``StageRun``). Import from the package.
"""

from __future__ import annotations

import os

from spectralar.tracking.pipeline import StageRecord, finish_pipeline, pipeline_key
from spectralar.tracking.runs import StageRun
from spectralar.tracking.store import (
    DVC_EXPERIMENTS_DIR, DVC_ROOT_ENV, git_commit, project_root, resolve_uri, tracking_enabled,
)
from spectralar.tracking.tags import (
    PARAMS_HASH, PARENT_RUN_ENV, PARENT_RUN_ID, PIPELINE_KEY, PIPELINE_RUN_ID, RESTORED, ROLE, STAGE,
)

__all__ = [
    "StageRun", "StageRecord", "finish_pipeline", "pipeline_key", "project_root", "resolve_uri",
    "tracking_enabled", "git_commit", "DVC_ROOT_ENV", "DVC_EXPERIMENTS_DIR", "PARENT_RUN_ENV",
    "ROLE", "STAGE", "PARAMS_HASH", "PIPELINE_KEY", "PIPELINE_RUN_ID", "RESTORED", "PARENT_RUN_ID",
]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before anything here imports mlflow
