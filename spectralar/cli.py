"""One CLI for both orchestrators: ``python -m spectralar <stage> --params params.yaml [paths...]``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
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


def ablation_row(params_file: str | Path) -> Optional[str]:
    """``<row>`` when the params file lives under ``runs/ablation/<row>/``, else None."""
    parts = Path(params_file).parts
    for i in range(len(parts) - 3):
        if parts[i:i + 2] == ("runs", "ablation"):
            return parts[i + 2]
    return None


def pipeline_tags(params: Params) -> dict[str, str]:
    """Tags of the MLflow pipeline run of a params file: the Table 4 switches and the ablation row."""
    tags = {f"spectralar.switch.{name}": str(getattr(params.tokenizer, name)).lower() for name in TABLE4_SWITCHES}
    row = ablation_row(params.path)
    if row is not None:
        tags["spectralar.ablation_row"] = row
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
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
