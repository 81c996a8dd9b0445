"""Pipeline stages. Stage name = DVC stage = Snakemake rule = CLI subcommand.

Each stage module defines:
  SECTIONS          params sections the stage reads (DVC `params:`, Snakemake `params:`, MLflow)
  add_arguments(p)  its input/output paths, each with the default used by dvc.yaml/Snakefile
  run(ctx) -> dict  the work; returns the metrics written to the stage's metrics JSON

Stages never know whether DVC or Snakemake called them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Pipeline order.
STAGES: tuple[str, ...] = (
    "prepare",
    "train_proxy",
    "extract_proxy_codes",
    "train_tokenizer",
    "train_evalnet",
    "reference_stats",
    "correlation",
    "dump_tokens",
    "train_generator",
    "sample",
    "evaluate",
    "report",
)


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(f"spectralar.stages.{name}")
