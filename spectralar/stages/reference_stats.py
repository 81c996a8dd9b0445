"""reference_stats: real-data feature statistics, once per dataset and feature extractor.

For each extractor in ``reference_stats.extractors`` this writes ``<name>.npz`` (mu and sigma in
float64 for FID, plus the raw features for KID and precision/recall) from the first ``num_images``
val images. ``domain`` uses the train_evalnet classifier; ``inception`` the TF-Inception (torch-fidelity's
weights file when ``inception_weights`` names it or it sits in the torch hub cache, else the offline
fid-helper TorchScript). For ImageNet, ``adm_reference`` may name ADM's VIRTUAL_imagenet256_labeled.npz,
whose mu/sigma are then used for ``inception`` instead.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from spectralar.config import require
from spectralar.data.shards import ImageShards
from spectralar.io import atomic_path
from spectralar.stages.common import stage_device



@dataclass(frozen=True)
class ReferenceStatsConfig:
    extractors: tuple[Literal["domain", "inception"], ...] = ("domain",)
    num_images: int = 10000
    batch_size: int = 256
    inception_weights: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth ("" = look up)
    adm_reference: str = ""  # ImageNet: VIRTUAL_imagenet256_labeled.npz

    def __post_init__(self) -> None:
        if not self.extractors:
            raise ValueError("extractors must be non-empty")
        require(self, "num_images", at_least=2, meaning="a covariance needs 2 images")
        require(self, "batch_size", at_least=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--evalnet", default="models/evalnet/evalnet.pt", help="train_evalnet model")
    parser.add_argument("--out", default="data/reference", help="output directory (<extractor>.npz)")


def run(ctx) -> dict:
    # imported here, not at the top: torch-fidelity brings torchvision and torch._dynamo (2 s), which every
    # stage would pay, since load_params imports this module for ReferenceStatsConfig
    from spectralar.evaluation.extractors import extractor_for
    from spectralar.evaluation.metrics import extract_features, load_adm_reference, reference_statistics, save_reference

    cfg: ReferenceStatsConfig = ctx.params.reference_stats
    shards = ImageShards(ctx.args.data, "val")
    index = shards.spread(cfg.num_images)  # evenly over the split: ImageFolder splits are class-sorted
    count = len(index)
    images = torch.from_numpy(shards.images(index)).permute(0, 3, 1, 2).contiguous()
    device = stage_device(ctx.params.run.device)
    metrics = {"num_images": count}
    out = Path(ctx.args.out)
    with atomic_path(out, directory=True) as tmp:
        for name in cfg.extractors:
            if name == "inception" and cfg.adm_reference:
                adm = load_adm_reference(cfg.adm_reference, load_images=False)
                save_reference(tmp / "inception.npz", {"mu": adm["mu"], "sigma": adm["sigma"], "features": None,
                                                       "num_samples": 0})
                metrics["inception"] = {"source": "adm_reference"}
                continue
            extractor, kwargs = extractor_for(name, cfg.inception_weights, ctx.args.evalnet)
            begin = time.perf_counter()
            features = extract_features(images, extractor, kwargs, batch_size=cfg.batch_size, device=device)
            metrics[f"{name}_images_per_second"] = round(count / (time.perf_counter() - begin), 1)  # telemetry
            save_reference(tmp / f"{name}.npz", reference_statistics(features["features"]))
            metrics[name] = {"extractor": extractor, "feature_dim": int(features["features"].shape[1])}
        ctx.write_config(tmp, num_images=count)
    ctx.log_outputs(out, ("config.json",))
    return metrics
