"""Pipeline stages. Stage name = DVC stage = Snakemake rule = CLI subcommand.

``STAGE_TABLE`` is the one light description of every stage (no stage module is imported to read
it): the params sections it reads (DVC ``params:``, the generated Snakemake rules, MLflow), whether
it uses a GPU when one is there (Snakemake/SLURM resources), whether it runs data-parallel under
torchrun, its one-line summary for ``python -m spectralar --help``, and the dataclass of its own
params section (``spectralar.config`` builds the section from it). The commands, deps and outs
are declared once, in ``dvc.yaml``.

Each stage module defines:
  add_arguments(p)  its input/output paths (the command lines in dvc.yaml pass them all)
  run(ctx) -> dict  the work; returns the metrics written to the stage's metrics JSON

Stage modules never import each other (file contracts live in ``spectralar.artifacts``) and never
know whether DVC or Snakemake called them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class StageInfo:
    name: str
    sections: tuple[str, ...]   # params sections the stage reads
    summary: str                # one line for --help
    gpu: bool = False           # uses one GPU when present (Snakemake resources: gpu=1)
    distributed: bool = False   # runs on N processes under torchrun (SPECTRALAR_NPROC_PER_NODE relaunches it):
                                # data-parallel training, or extract_proxy_codes' row shards (RANK / WORLD_SIZE)
    config: str = ""            # "module:Class" of the params section named after the stage ("" = none)


# Pipeline order.
_CONFIG = "spectralar.stages.{0}:{1}"
STAGE_TABLE: dict[str, StageInfo] = {info.name: info for info in (
    StageInfo("prepare", ("run", "data"),
              "read the raw dataset and write train/val image shards with a manifest"),
    StageInfo("train_proxy", ("run", "proxy", "train_proxy"),
              "the proxy VQ model whose codes supervise tokenizer stage 1 (TiTok's proxy codes)",
              gpu=True, config=_CONFIG.format("train_proxy", "TrainProxyConfig")),
    StageInfo("extract_proxy_codes", ("run", "tokenizer", "extract_proxy_codes"),
              "proxy codes of every spectral level's target I'_i for every training image",
              gpu=True, distributed=True, config=_CONFIG.format("extract_proxy_codes", "ExtractProxyCodesConfig")),
    StageInfo("train_tokenizer", ("run", "tokenizer", "train_tokenizer"),
              "Nested Spectral Tokenization (paper §3.2, Algorithm 1), TiTok's two stages",
              gpu=True, distributed=True, config=_CONFIG.format("train_tokenizer", "TrainTokenizerConfig")),
    StageInfo("train_evalnet", ("run", "train_evalnet"),
              "the small domain classifier behind the fast FID/IS/KID/precision/recall",
              gpu=True, config=_CONFIG.format("train_evalnet", "TrainEvalnetConfig")),
    StageInfo("reference_stats", ("run", "reference_stats"),
              "real-data feature statistics, once per dataset and feature extractor",
              gpu=True, config=_CONFIG.format("reference_stats", "ReferenceStatsConfig")),
    StageInfo("correlation", ("run", "correlation"),
              "Table 1: how well each token is a linear function of the tokens before it",
              config=_CONFIG.format("correlation", "CorrelationConfig")),
    StageInfo("dump_tokens", ("run", "dump_tokens"),
              "the training set as spectral token sequences, the generator's data (paper §3.3)",
              gpu=True, config=_CONFIG.format("dump_tokens", "DumpTokensConfig")),
    StageInfo("train_generator", ("run", "generator", "train_generator"),
              "the class-conditional spectral AR generator, VAR's recipe (paper §3.3, §4.1)",
              gpu=True, distributed=True, config=_CONFIG.format("train_generator", "TrainGeneratorConfig")),
    StageInfo("sample", ("run", "sample"),
              "class-conditional generation, truncated generation and spectrum completion (§3.3, §4.4)",
              gpu=True, config=_CONFIG.format("sample", "SampleConfig")),
    StageInfo("evaluate", ("run", "evaluate"),
              "sample quality, reconstruction quality and truncated generation (paper §4, Tables 2-3)",
              gpu=True, config=_CONFIG.format("evaluate", "EvaluateConfig")),
    StageInfo("report", ("run", "sweeps"),
              "one Markdown page of the results beside the paper's, and the pipeline's MLflow record"),
)}
STAGES: tuple[str, ...] = tuple(STAGE_TABLE)
GPU_STAGES: frozenset[str] = frozenset(name for name, info in STAGE_TABLE.items() if info.gpu)


def stage_info(name: str) -> StageInfo:
    if name not in STAGE_TABLE:
        raise KeyError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return STAGE_TABLE[name]


def load_stage(name: str) -> ModuleType:
    """The stage's module (imported on demand: it may pull in torch or torch-fidelity)."""
    stage_info(name)
    return importlib.import_module(f"spectralar.stages.{name}")
