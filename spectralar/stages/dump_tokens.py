"""dump_tokens: the training set as spectral token sequences, the generator's data (paper §3.3).

The generator learns p(t_{i+1} | t_1..t_i, class) over the N token ids the trained tokenizer gives
each image (eq. 8). Tokenizing once, here, makes generator training a pass over a small integer
table (60k x 16 uint16 = 1.9 MB for the default) instead of a tokenizer forward per step.
Outputs (one directory, written atomically): ``train.npy`` uint16 (images, N), ``labels.npy`` int64,
the same for the val split (``val.npy``, ``val_labels.npy``; the generator's held-out loss) and
``manifest.json`` (num_tokens, vocab, num_classes, class_names, omegas, tokenizer sha256, and each
file's shape, dtype, size and sha256, which the reader checks).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spectralar.artifacts import CONFIG, MANIFEST, MAX_UINT16_VOCAB as MAX_VOCAB, load_codec, write_tokens
from spectralar.config import require
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.evaluation.measures import codebook_statistics
from spectralar.io import atomic_path, sha256_file, write_manifest
from spectralar.log import progress
from spectralar.models.codec import SpectralCodec
from spectralar.stages.common import stage_device


@dataclass(frozen=True)
class DumpTokensConfig:
    batch_size: int = 500  # images per tokenizer forward

    def __post_init__(self) -> None:
        require(self, "batch_size", at_least=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--tokenizer", default="models/tokenizer/tokenizer.pt", help="trained tokenizer file")
    parser.add_argument("--out", default="data/tokens", help="output directory")


@torch.no_grad()
def tokenize_split(codec: SpectralCodec, shards: ImageShards, batch_size: int, device: torch.device,
                   desc: str = "tokenize") -> np.ndarray:
    """Token ids (images, N) uint16 of a whole split, in dataset order (fixed batches: deterministic)."""
    count = len(shards)
    ids = np.zeros((count, codec.num_tokens), dtype=np.uint16)
    starts = range(0, count, batch_size)
    for start in progress(starts, total=len(starts), desc=desc, unit="batch", log_every=20):
        stop = min(start + batch_size, count)
        images = torch.from_numpy(shards.images(np.arange(start, stop))).permute(0, 3, 1, 2)  # (b, C, H, W) uint8
        ids_BN = codec.encode(to_float(images.to(device)))  # (b, N)
        ids[start:stop] = ids_BN.cpu().numpy().astype(np.uint16)
    return ids


def run(ctx) -> dict:
    cfg: DumpTokensConfig = ctx.params.dump_tokens
    device = stage_device(ctx.params.run.device)
    codec = load_codec(ctx.args.tokenizer, device)
    vocab = codec.tokenizer.config.codebook_size
    if vocab > MAX_VOCAB:
        raise ValueError(f"tokenizer codebook_size {vocab} does not fit uint16 token ids (max {MAX_VOCAB})")
    train, val = ImageShards(ctx.args.data, "train"), ImageShards(ctx.args.data, "val")
    begin = time.perf_counter()
    ids = {split: tokenize_split(codec, shards, cfg.batch_size, device, f"tokenize {split}")
           for split, shards in (("train", train), ("val", val))}
    seconds = time.perf_counter() - begin  # the ids are on the host: the device's work is done
    manifest = {
        "num_tokens": codec.num_tokens,
        "vocab": vocab,
        "num_classes": train.num_classes,
        "class_names": train.class_names,
        "omegas": list(codec.omegas),
        "image_shape": list(train.image_shape),
        "images": {"train": len(train), "val": len(val)},
        "tokenizer_sha256": sha256_file(ctx.args.tokenizer),
    }
    out = Path(ctx.args.out)
    with atomic_path(out, directory=True) as tmp:
        files = {**write_tokens(tmp, "train", ids["train"], train.labels),
                 **write_tokens(tmp, "val", ids["val"], val.labels)}
        write_manifest(tmp / MANIFEST, {**manifest, "files": files})  # what load_tokens checks
        ctx.write_config(tmp, num_tokens=codec.num_tokens, vocab=vocab)
    ctx.log_outputs(out, (MANIFEST, CONFIG))
    usage = codebook_statistics(torch.from_numpy(ids["train"].astype(np.int64)), vocab)["codebook_usage"]
    rate = (len(train) + len(val)) / seconds
    ctx.log.info("tokenized %d train + %d val images into %d tokens each (%.1f images/s); %.1f%% of %d codes used",
                 len(train), len(val), codec.num_tokens, rate, 100 * usage, vocab)
    return {"train_images": len(train), "val_images": len(val), "num_tokens": codec.num_tokens,
            "vocab": vocab, "codebook_usage": round(usage, 4),
            "images_per_second": round(rate, 1)}  # telemetry: the timing file and MLflow, not the metrics
