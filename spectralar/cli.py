"""One CLI for both orchestrators: ``python -m spectralar <stage> --params params.yaml [paths...]``.

Light until a stage runs: the parser lists the stages from ``spectralar.stages.STAGE_TABLE`` and
imports only the chosen stage's module (for its arguments, then its ``run``), so ``--help`` imports no
stage and a stage's ``--help`` no model or evaluation code. A run reads the params file, whose check
imports every stage's config class (torch with them), but torch-fidelity and torchvision are imported
only by the functions that use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from spectralar.config import ConfigError, check_sections_together, load_params
from spectralar.io import ArtifactError, split_telemetry, timing_file, write_json
from spectralar.log import get_logger, setup_logging
from spectralar.stages import STAGE_TABLE, load_stage, stage_info
from spectralar.stages.context import StageBusyError, StageContext, pipeline_tags, remove_stale_outputs, stage_lock


class StageParser(argparse.ArgumentParser):
    """One stage's subcommand. The stage's module (which may pull in torch or torch-fidelity)
    is imported, to add the stage's own arguments, only when this subcommand is parsed: ``--help``
    and the parser of any other stage stay light."""

    def __init__(self, *args: Any, stage: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.stage_arguments_added = False
        self.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        self.add_argument("--metrics", default=f"metrics/{stage}.json", help="metrics JSON output")

    def parse_known_args(self, args=None, namespace=None):
        if not self.stage_arguments_added:
            load_stage(self.stage).add_arguments(self)
            self.stage_arguments_added = True
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser, built from the stage table alone (no stage module is imported here)."""
    parser = argparse.ArgumentParser(prog="spectralar", description="Run one pipeline stage (DVC and Snakemake "
                                     "call the same command lines).")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE", parser_class=StageParser)
    for name, info in STAGE_TABLE.items():
        sub.add_parser(name, stage=name, help=info.summary, description=f"{name}: {info.summary}")
    return parser


def launch_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 for a plain launch."""
    return int(os.environ.get("RANK", "0"))


def run_stage(name: str, args: argparse.Namespace) -> dict:
    """Run one stage. Under torchrun every rank does the work, but only rank 0 writes the
    metrics file and opens an MLflow run (the others would race on both)."""
    from spectralar.tracking import StageRun
    from spectralar.training import seed_everything  # torch: imported once a stage runs

    log = get_logger(name)
    module = load_stage(name)
    params = load_params(args.params)
    sections: tuple[str, ...] = stage_info(name).sections
    check_sections_together(params, sections)
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
            results, telemetry = split_telemetry(metrics)
            write_json(args.metrics, results)  # what a rerun reproduces
            write_json(timing_file(args.metrics), telemetry)  # timings and rates, git-ignored
            tracker.log_results(metrics)  # metrics; constants and text as params
            tracker.log_artifact(args.metrics)
    if main_rank:
        log.info("%s done in %.1f s; metrics in %s", name, metrics["stage_seconds"], args.metrics)
    return metrics


NPROC_VARIABLE = "SPECTRALAR_NPROC_PER_NODE"


def torchrun_command(stage: str, argv: Sequence[str], environ: Optional[dict] = None) -> Optional[list[str]]:
    """The torchrun command line that reruns ``argv`` on N processes of this node, or None.

    ``SPECTRALAR_NPROC_PER_NODE`` = N, or ``auto`` (one process per visible CUDA device), asks for it.
    Only stages the stage table marks ``distributed`` relaunch, and never a process torchrun already
    started (``RANK`` set), so DVC and Snakemake keep one command line for 1 or 8 GPUs.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(NPROC_VARIABLE, "").strip()
    if not value or "RANK" in environ or not stage_info(stage).distributed:
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
        with stage_lock(args.stage, args.metrics):  # one writer per stage output, DVC and Snakemake alike
            relaunch = torchrun_command(args.stage, argv)
            if relaunch is not None:
                get_logger().info("%s=%s: running %s", NPROC_VARIABLE, os.environ[NPROC_VARIABLE], " ".join(relaunch))
                return subprocess.call(relaunch)
            remove_stale_outputs(args, get_logger(args.stage))
            run_stage(args.stage, args)
    except StageBusyError as err:
        get_logger().error("%s", err)
        return 2
    except ConfigError as err:
        get_logger().error("bad params: %s", err)
        return 2
    except ArtifactError as err:  # an input file truncated or corrupt: its name and what to rerun, no traceback
        get_logger().error("%s", err)
        return 2
    except FileNotFoundError as err:
        get_logger().error("%s", err)
        return 2
    except OSError as err:  # the machine, not the code: a full disk, a read-only folder, a missing permission
        get_logger().error("%s (%s)", err, type(err).__name__)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
