"""prepare: read the raw dataset and write train/val image shards with a manifest.

``data.source: fashion_mnist`` reads Debian's idx files and centres each 28x28 image in a
``data.resolution`` frame; ``data.source: imagefolder`` reads ImageNet or any class-per-folder tree
on ``data.workers`` processes, ADM-center-crops to ``data.resolution`` and records every skipped
file with its reason. Rerunning on the same input writes byte-identical files.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections import Counter
from functools import partial
from pathlib import Path

from spectralar.config import DataConfig
from spectralar.data import fashion_mnist, imagefolder
from spectralar.data.shards import DTYPES, MANIFEST
from spectralar.data.writer import ShardWriter
from spectralar.io import ArtifactError, atomic_path, sha256_file, write_manifest
from spectralar.log import progress



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/prepared", help="prepared dataset directory")


def run(ctx) -> dict:
    cfg: DataConfig = ctx.params.data
    out = Path(ctx.args.out)
    start = time.perf_counter()
    with atomic_path(out, directory=True) as tmp:
        if cfg.source == "fashion_mnist":
            manifest = prepare_fashion_mnist(cfg, tmp)
        else:
            manifest = prepare_imagefolder(cfg, tmp, log=ctx.log)
        write_manifest(tmp / MANIFEST, manifest)
        ctx.write_config(tmp)
    seconds = time.perf_counter() - start
    total = sum(s["count"] for s in manifest["splits"].values())
    skipped = len(manifest["skipped"])
    if skipped:
        ctx.log.warning("skipped %d files (reasons in %s)", skipped, out / MANIFEST)
    ctx.log.info("prepared %d images in %.1f s (%.0f images/s)", total, seconds, total / max(seconds, 1e-9))
    ctx.tracker.log_artifact(out / MANIFEST)
    return {
        "images": {split: s["count"] for split, s in manifest["splits"].items()},
        "num_classes": len(manifest["class_names"]),
        "skipped": skipped,
        "images_per_second": round(total / max(seconds, 1e-9), 1),
        "workers": cfg.workers if cfg.source == "imagefolder" else 1,
    }


def _manifest(cfg: DataConfig, class_names, image_shape, splits: dict, skipped: list, sources: dict) -> dict:
    return {
        "source": cfg.source,
        "format": "raw" if cfg.source == "fashion_mnist" else cfg.shard_format,
        "class_names": list(class_names),
        "image_shape": list(image_shape),  # (H, W, C)
        "dtypes": dict(DTYPES),  # of the shards' images, labels and (jpeg) offsets
        "splits": splits,
        "skipped": skipped,
        "sources": sources,
    }


def _counts(labels, class_names) -> dict:
    counts = Counter(int(x) for x in labels)
    return {name: counts.get(k, 0) for k, name in enumerate(class_names)}


def prepare_fashion_mnist(cfg: DataConfig, out: Path) -> dict:
    splits, sources = {}, {}
    for split in ("train", "val"):
        images, labels = fashion_mnist.load_split(cfg.fashion_mnist_dir, split, cfg.resolution)
        if cfg.max_images_per_class is not None:
            keep = [i for k in range(len(fashion_mnist.CLASS_NAMES))
                    for i in (labels == k).nonzero()[0][: cfg.max_images_per_class]]
            keep.sort()
            images, labels = images[keep], labels[keep]
        writer = ShardWriter(out, split, fmt="raw", shard_size=cfg.shard_size)
        for image, label in zip(images, labels):
            writer.append(image, int(label))
        splits[split] = {**writer.close(), "per_class": _counts(labels, fashion_mnist.CLASS_NAMES)}
        for name in fashion_mnist.FILES[split]:
            sources[name] = sha256_file(Path(cfg.fashion_mnist_dir) / name)
    shape = (cfg.resolution, cfg.resolution, 1)
    return _manifest(cfg, fashion_mnist.CLASS_NAMES, shape, splits, [], sources)


def prepare_imagefolder(cfg: DataConfig, out: Path, log) -> dict:
    class_names, samples = imagefolder.scan(cfg.imagefolder_root, cfg.max_images_per_class)
    if "val" not in samples:
        log.warning("%s has no val/ folder: the val split is empty", cfg.imagefolder_root)
        samples["val"] = []
    root = Path(cfg.imagefolder_root)
    worker = partial(imagefolder.load_image, size=cfg.resolution, min_size=cfg.min_image_size,
                     fmt=cfg.shard_format, quality=cfg.jpeg_quality)
    splits, skipped = {}, []
    # fork is fine here: workers only run PIL on paths; ordered imap keeps the output deterministic
    with mp.get_context("fork").Pool(cfg.workers) as pool:
        for split, items in samples.items():
            writer = ShardWriter(out, split, fmt=cfg.shard_format, shard_size=cfg.shard_size)
            labels = []
            results = pool.imap(_unpack, [(worker, s.path, s.label) for s in items], chunksize=16)
            for path, (payload, label, reason) in progress(
                zip((s.path for s in items), results), total=len(items), desc=f"prepare {split}",
                unit="img", log_every=5000, logger=log,
            ):
                if reason is not None:
                    skipped.append({"split": split, "path": str(Path(path).relative_to(root)), "reason": reason})
                    continue
                writer.append(payload, label)
                labels.append(label)
            splits[split] = {**writer.close(), "per_class": _counts(labels, class_names)}
    for item in skipped:  # before any error below, which points at them
        log.warning("skipped %s/%s: %s", item["split"], item["path"], item["reason"])
    for split, entry in splits.items():
        empty = [name for name, n in entry["per_class"].items() if n == 0]
        if split == "train" and empty:
            raise ArtifactError(_no_training_image(empty[0], skipped))
        if split == "train" and entry["count"] == 0:
            raise ArtifactError(f"{cfg.imagefolder_root}: no readable images")
    shape = (cfg.resolution, cfg.resolution, 3)
    return _manifest(cfg, class_names, shape, splits, skipped, {"root": str(root)})


def _no_training_image(name: str, skipped: list[dict]) -> str:
    """Why class ``name`` ended with no training image: its skipped files, when there are any."""
    own = [item for item in skipped if item["split"] == "train" and Path(item["path"]).parent.name == name]
    if not own:
        return f"class {name!r} has no readable training image (none of its files was read)"
    first = own[0]
    return (f"class {name!r} has no readable training image: all {len(own)} of its files were skipped "
            f"({first['path']}: {first['reason']}{'; the others are logged above' if len(own) > 1 else ''})")


def _unpack(job):
    worker, path, label = job
    return worker(path, label)
