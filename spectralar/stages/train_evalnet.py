"""train_evalnet: the small domain classifier behind the fast FID/IS/KID/precision/recall.

The TF-Inception network that FID papers use sees 299 px natural photos and runs at ~5 images/s on
2 CPU cores; for the embedded Fashion-MNIST default a classifier trained on the prepared data gives
the same metrics in seconds, plus the share of conditional samples classified as their class.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from spectralar.config import require
from spectralar.data.shards import ImageShards
from spectralar.evaluation.domain import save_domain_net, train_domain_net
from spectralar.io import atomic_path
from spectralar.stages.common import stage_device



@dataclass(frozen=True)
class TrainEvalnetConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 16
    feature_dim: int = 128
    max_train_images: int = 60000  # first images of the train split

    def __post_init__(self) -> None:
        require(self, "epochs", "batch_size", "width", "feature_dim", "max_train_images", at_least=1)
        require(self, "lr", above=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--out", default="models/evalnet", help="output directory (evalnet.pt)")


def _split(shards: ImageShards, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = shards.spread(limit)  # every class, also when an ImageFolder split is class-sorted
    images = torch.from_numpy(shards.images(index)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, C, H, W)
    return images, torch.from_numpy(shards.labels[index])


def run(ctx) -> dict:
    cfg: TrainEvalnetConfig = ctx.params.train_evalnet
    train = ImageShards(ctx.args.data, "train")
    images, labels = _split(train, cfg.max_train_images)
    val_images, val_labels = _split(ImageShards(ctx.args.data, "val"), 10**9)
    model, accuracy = train_domain_net(
        images, labels, val_images=val_images, val_labels=val_labels, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=ctx.params.run.seed, width=cfg.width,
        feature_dim=cfg.feature_dim, num_classes=train.num_classes, device=stage_device(ctx.params.run.device),
    )
    with atomic_path(Path(ctx.args.out), directory=True) as tmp:
        save_domain_net(model.cpu(), str(tmp / "evalnet.pt"))
        ctx.write_config(tmp, num_classes=train.num_classes)
    ctx.log.info("domain classifier: val accuracy %.2f%%", 100 * accuracy)
    ctx.log_outputs(ctx.args.out, ("config.json",), checkpoints=("evalnet.pt",))
    return {"val_accuracy": round(accuracy, 4), "train_images": len(images), "val_images": len(val_images)}
