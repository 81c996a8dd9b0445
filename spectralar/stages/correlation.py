"""correlation: Table 1 — how well each token is a linear function of the tokens before it.

Protocol (the paper's setup text is lost; ours is in spectralar/evaluation/correlation.py and the
README): 4 ordered tokens per image under three paradigms (raster quadrants, a VAR-style scale
pyramid, nested DCT bands), ridge regression of every element of t_k on all elements of t_1..t_{k-1}
pooled over images, R² measured on held-out images and averaged over elements. Also the Figure-4
map of which earlier element best predicts each element of t_4.
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from spectralar.config import FieldError, require
from spectralar.data.shards import ImageShards
from spectralar.evaluation.correlation import (
    PAPER_TABLE1,
    PARADIGMS,
    best_predictor_map,
    correlation_table,
    downsample,
    render_best_predictor_map,
)
from spectralar.io import atomic_path, write_text



@dataclass(frozen=True)
class CorrelationConfig:
    split: Literal["train", "val"] = "val"
    num_images: int = 4000  # images spread evenly over the split (all classes; CPU cost grows ~linearly)
    train_fraction: float = 0.8  # fit on this share of the images, score R² on the rest
    mode: Literal["canvas", "increment"] = "canvas"
    # Side of the images analysed (area-downsampled from the prepared size); null = as prepared. The
    # cost is quadratic in C·H·W (Figure 4 correlates every element of t4 with every earlier one, and
    # the ridge fits regress on 3·C·H·W inputs): 256 px would need (3·256²)² products per image.
    resolution: Optional[int] = None

    def __post_init__(self) -> None:
        require(self, "num_images", at_least=10)
        require(self, "train_fraction", above=0, below=1)
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise FieldError("resolution", self.resolution, "null or a multiple of 8 (the tokens' quadrants and scales)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--out", default="reports/correlation", help="table CSV and Figure-4 PNG")


def run(ctx) -> dict:
    cfg: CorrelationConfig = ctx.params.correlation
    shards = ImageShards(ctx.args.data, cfg.split)
    index = shards.spread(cfg.num_images)  # evenly over the split (ImageFolder splits are class-sorted)
    count = len(index)
    images = shards.images(index).transpose(0, 3, 1, 2).astype(np.float64) / 255.0  # (N, C, H, W)
    images = downsample(images, cfg.resolution)
    table = correlation_table(images, train_fraction=cfg.train_fraction, seed=ctx.params.run.seed, mode=cfg.mode)
    maps = {p: best_predictor_map(images, p, mode=cfg.mode) for p in PARADIGMS}
    out = Path(ctx.args.out)
    with atomic_path(out, directory=True) as tmp:
        render_best_predictor_map(maps, tmp / "best_predictor.png",
                                  title="Figure 4: which earlier element best predicts each element of t4")
        write_text(tmp / "table1.csv", _csv(table))
        ctx.write_config(tmp, num_images=count)
    for name in ("best_predictor.png", "table1.csv"):
        ctx.tracker.log_artifact(out / name)
    ctx.log.info("R² average: %s", {p: round(table[p]["average"], 3) for p in PARADIGMS})
    return {**{p: table[p] for p in PARADIGMS}, "paper_table1": PAPER_TABLE1, "protocol": table["protocol"],
            "num_images": count, "resolution": images.shape[-1]}


def _csv(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["paradigm", "r2_t2", "r2_t3", "r2_t4", "average", "paper_r2_t2", "paper_r2_t3",
                     "paper_r2_t4", "paper_average"])
    keys = ("r2_t2", "r2_t3", "r2_t4", "average")
    for p in PARADIGMS:
        writer.writerow([p, *(round(table[p][k], 4) for k in keys), *(PAPER_TABLE1[p][k] for k in keys)])
    return buffer.getvalue()
