"""Benchmarks (not tests): ``python -m spectralar.bench <what> [...]``.

  read   prepare throughput and shard read throughput for JPEG shards at a given resolution, on a
         synthetic photo-like ImageFolder (or an existing prepared dataset with --data), plus the
         bytes per image and the extrapolated size of ImageNet's 1,281,167 training images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET_TRAIN_IMAGES = 1_281_167


def _synthetic_photos(root: Path, count: int, size: int, seed: int = 0) -> None:
    """JPEGs with photo-like statistics: a 1/f spectrum (natural images' power law) plus grain,
    at ImageNet's typical 500x375 size, so encode/decode cost and file sizes are realistic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = 375, 500
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(height, width))
    for k in range(count):
        directory = root / "train" / f"n{k % 10:08d}"
        directory.mkdir(parents=True, exist_ok=True)
        channels = []
        for _ in range(3):
            noise = np.fft.fft2(rng.standard_normal((height, width))) * falloff
            field = np.real(np.fft.ifft2(noise))
            channels.append((field - field.mean()) / (field.std() + 1e-8))
        image = np.stack(channels, -1) * 50 + 120 + rng.normal(0, 2, (height, width, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(directory / f"img_{k:05d}.JPEG", quality=90)


def bench_read(args: argparse.Namespace) -> dict:
    from spectralar.config import DataConfig
    from spectralar.data.shards import ImageShards
    from spectralar.stages.prepare import prepare_imagefolder
    from spectralar.io import write_json
    import logging

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            source = Path(tmp) / "photos"
            _synthetic_photos(source, args.num, args.resolution)
            cfg = DataConfig(source="imagefolder", imagefolder_root=str(source), resolution=args.resolution,
                             workers=args.workers, shard_size=1000, shard_format="jpeg", jpeg_quality=95)
            data = Path(tmp) / "prepared"
            start = time.perf_counter()
            manifest = prepare_imagefolder(cfg, data, log=logging.getLogger("spectralar.bench"))
            write_json(data / "manifest.json", manifest)
            seconds = time.perf_counter() - start
            result["prepare_images_per_second"] = round(args.num / seconds, 1)
            result["prepare_images_per_second_per_worker"] = round(args.num / seconds / args.workers, 1)
        shards = ImageShards(data, args.split)
        size = sum((data / f"{s.stem}.bin").stat().st_size for s in shards.shards) if shards.format == "jpeg" else 0
        order = np.random.default_rng(0).permutation(len(shards))[: args.num]
        start = time.perf_counter()
        for begin in range(0, len(order), 256):
            shards.images(order[begin:begin + 256])
        seconds = time.perf_counter() - start
        result.update({
            "format": shards.format,
            "resolution": shards.image_shape[0],
            "images_read": len(order),
            "read_images_per_second_one_core": round(len(order) / seconds, 1),
            "bytes_per_image": round(size / max(len(shards), 1)),
            "imagenet_train_gb_extrapolated": round(size / max(len(shards), 1) * IMAGENET_TRAIN_IMAGES / 1e9, 1),
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m spectralar.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    read = sub.add_parser("read", help="prepare + shard read throughput")
    read.add_argument("--data", help="an existing prepared dataset (default: a synthetic one)")
    read.add_argument("--split", default="train")
    read.add_argument("--num", type=int, default=1000)
    read.add_argument("--resolution", type=int, default=256)
    read.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps({"read": bench_read}[args.what](args), indent=2))


if __name__ == "__main__":
    main()
