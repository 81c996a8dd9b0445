"""One CLI for both orchestrators: ``python -m spectralar <stage> --params params.yaml [paths...]``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from spectralar.config import ConfigError, Params, load_params
from spectralar.io import read_json, write_json
from spectralar.log import get_logger, setup_logging
from spectralar.stages import STAGES, load_stage
from spectralar.training import seed_everything

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectralar", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        module = load_stage(name)
        stage_parser = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        stage_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        stage_parser.add_argument("--metrics", default=f"metrics/{name}.json", help="metrics JSON output")
        module.add_arguments(stage_parser)
    return parser


def launch_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 for a plain launch."""
    return int(os.environ.get("RANK", "0"))


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
    it: the params sections it depends on (as ``run_stage`` logs them), its metrics file (default
    ``metrics/<name>.json``; raises FileNotFoundError if missing), and ``artifacts`` (paths) plus
    the metrics file as artifacts."""
    from spectralar.tracking import StageRecord

    sections = tuple(load_stage(name).SECTIONS)
    metrics_path = Path(metrics_file if metrics_file is not None else f"metrics/{name}.json")
    metrics = read_json(metrics_path)
    return StageRecord(name, params.subset(sections), params.digest(sections), metrics,
                       tuple(str(p) for p in (*artifacts, metrics_path)))


def run_stage(name: str, args: argparse.Namespace) -> dict:
    """Run one stage. Under torchrun every rank does the work, but only rank 0 writes the
    metrics file and opens an MLflow run (the others would race on both)."""
    from spectralar.tracking import StageRun

    log = get_logger(name)
    module = load_stage(name)
    params = load_params(args.params)
    sections: tuple[str, ...] = tuple(module.SECTIONS)
    main_rank = launch_rank() == 0
    seed_everything(params.run.seed)
    start = time.perf_counter()
    tracking = params.tracking if main_rank else dataclasses.replace(params.tracking, enabled=False)
    with StageRun(tracking, name, params=params.subset(sections), params_hash=params.digest(sections),
                  params_file=params.path, pipeline_tags=pipeline_tags(params)) as tracker:
        ctx = StageContext(name, params, args, sections, tracker, log)
        metrics = dict(module.run(ctx))
        metrics["stage_seconds"] = round(time.perf_counter() - start, 3)
        if main_rank:
            write_json(args.metrics, metrics)
            tracker.log_metrics(metrics)
            tracker.log_artifact(args.metrics)
    if main_rank:
        log.info("%s done in %.1f s; metrics in %s", name, metrics["stage_seconds"], args.metrics)
    return metrics


NPROC_VARIABLE = "SPECTRALAR_NPROC_PER_NODE"


def torchrun_command(stage: str, argv: Sequence[str], environ: Optional[dict] = None) -> Optional[list[str]]:
    """The torchrun command line that reruns ``argv`` on N processes of this node, or None.

    ``SPECTRALAR_NPROC_PER_NODE`` = N, or ``auto`` (one process per visible CUDA device), asks for it.
    Only stages that declare ``DISTRIBUTED = True`` relaunch, and never a process torchrun already
    started (``RANK`` set), so DVC and Snakemake keep one command line for 1 or 8 GPUs.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(NPROC_VARIABLE, "").strip()
    if not value or "RANK" in environ or not getattr(load_stage(stage), "DISTRIBUTED", False):
        return None
    if value == "auto":
        import torch

        processes = torch.cuda.device_count()
    elif value.isdigit():
        processes = int(value)
    else:
        raise ConfigError(f"{NPROC_VARIABLE} must be a number of processes or 'auto', got {value!r}")
    if processes <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "spectralar", *argv]


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        relaunch = torchrun_command(args.stage, argv)
        if relaunch is not None:
            get_logger().info("%s=%s: running %s", NPROC_VARIABLE, os.environ[NPROC_VARIABLE], " ".join(relaunch))
            return subprocess.call(relaunch)
        run_stage(args.stage, args)
    except ConfigError as err:
        get_logger().error("bad params: %s", err)
        return 2
    except FileNotFoundError as err:
        get_logger().error("%s", err)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
