"""extract_proxy_codes: proxy codes of every spectral level's target I'_i for every training image.

Tokenizer stage 1 supervises the decoder from prefix s_1..s_i with the proxy codes of the
band-limited image I'_i = IDCT(DCT(I) ∘ 1_{ω_i}) (eq. 5, Algorithm 1). This stage precomputes them
as a uint16 table (images, levels, h*w). With ``mode: online`` it writes no table and
train_tokenizer computes the codes of the sampled level on the fly (README: when to use which).

Memory does not grow with the number of images or levels: a batch of ``batch_size`` images becomes
images × levels band-limited targets, and the proxy encodes them ``batch_size`` at a time (ImageNet's
64 levels at 256 px would otherwise make one forward of 64 × batch_size MaskGIT passes: 13.3 GB at
batch_size 1, measured); each finished batch of rows goes to the table file with ``pwrite``, not
through a memory map, whose dirty pages would count in the process's resident memory until the
whole 42 GB table had passed through it.

Resumable and shardable: rank r of W (``--rank``/``--world-size``, default torchrun's RANK and
WORLD_SIZE) computes the contiguous rows [r·n/W, (r+1)·n/W) of one shared table and records its
progress in its own file, so a killed rank continues from its last finished batch; rank 0 waits for
every rank's rows, then checksums the table and moves it into place.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from spectralar.artifacts import MANIFEST, PROXY_CODES_TABLE as TABLE, load_proxy, proxy_code_levels, \
    tokenizer_config_for
from spectralar.config import require
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.io import (array_record, atomic_path, read_json, read_manifest, replace_directory, sha256_file, write_json,
                           write_manifest)
from spectralar.log import progress
from spectralar.models.proxy_vq import ProxyVQModel
from spectralar.spectral import band_limit
from spectralar.stages.common import stage_device

TABLE_DIGEST = "table.digest"  # which manifest the table in a partial directory was created for
LOCK = ".lock"  # serialises ranks creating, resetting or finishing the partial table
WAIT_SECONDS = 5.0  # rank 0's poll interval while other ranks finish their rows


@dataclass(frozen=True)
class ExtractProxyCodesConfig:
    mode: Literal["precomputed", "online"] = "precomputed"
    # images per batch (the unit of progress and of writes); the proxy also encodes this many band-limited
    # targets per forward, so device memory is that of a batch_size-image forward whatever the level count
    batch_size: int = 500

    def __post_init__(self) -> None:
        require(self, "batch_size", at_least=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--proxy", default="models/proxy/proxy.pt", help="proxy model file")
    parser.add_argument("--out", default="data/proxy_codes", help="output directory")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")),
                        help="this process's shard of the rows (default: $RANK, 0)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="number of shards (default: $WORLD_SIZE, 1); rank 0 assembles the table")


@torch.no_grad()
def codes_for_levels(proxy: ProxyVQModel, images_BCHW: torch.Tensor, omegas: tuple[int, ...],
                     passes_per_forward: int) -> np.ndarray:
    """Proxy codes uint16 (B, L, h*w) of the band-limited images for every ω in ``omegas``.

    The B·L targets are built and encoded ``passes_per_forward`` at a time, level fastest."""
    batch, levels = images_BCHW.shape[0], len(omegas)
    omega_L = torch.tensor(omegas, device=images_BCHW.device)
    codes = None
    for start in range(0, batch * levels, passes_per_forward):
        pairs = torch.arange(start, min(start + passes_per_forward, batch * levels), device=images_BCHW.device)
        targets = band_limit(images_BCHW[pairs // levels], omega_L[pairs % levels])  # (P, C, H, W)
        ids = proxy.encode_ids(targets).flatten(1)  # (P, h*w)
        if codes is None:
            codes = np.empty((batch * levels, ids.shape[1]), dtype=np.uint16)
        codes[start:start + len(pairs)] = ids.cpu().numpy()
    return codes.reshape(batch, levels, -1)


def shard_rows(images: int, rank: int, world_size: int) -> range:
    """The contiguous rows of ``rank``: together the ranks cover 0..images once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank must lie in [0, --world-size={world_size}), got {rank}")
    return range(images * rank // world_size, images * (rank + 1) // world_size)


def run(ctx) -> dict:
    cfg: ExtractProxyCodesConfig = ctx.params.extract_proxy_codes
    out = Path(ctx.args.out)
    shards = ImageShards(ctx.args.data, "train")
    omegas = proxy_code_levels(tokenizer_config_for(ctx.params.tokenizer, shards.image_shape))
    proxy_path = Path(ctx.args.proxy)
    manifest = {
        "mode": cfg.mode,
        "omegas": list(omegas),
        "images": len(shards),
        "proxy_sha256": sha256_file(proxy_path),
        "data_sha256": shards.manifest["splits"]["train"]["sha256"],
    }
    if cfg.mode == "online":
        with atomic_path(out, directory=True) as tmp:
            write_manifest(tmp / MANIFEST, manifest)
            ctx.write_config(tmp)
        return {"mode": "online", "levels": len(omegas), "images": len(shards)}
    rank, world_size = ctx.args.rank, ctx.args.world_size
    rows = shard_rows(len(shards), rank, world_size)
    device = stage_device(ctx.params.run.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per rank
    proxy = load_proxy(proxy_path, device)
    positions = proxy.config.grid_size ** 2
    if proxy.config.codebook_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"proxy codebook of {proxy.config.codebook_size} codes does not fit uint16")
    shape = (len(shards), len(omegas), positions)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    partial = out.with_name(out.name + ".partial")  # not a declared output: survives DVC's clean-up
    finished = _open_partial(partial, manifest, digest, shape)
    done = rows.stop if finished else _rows_done(partial / f"progress-{rank}.json", digest, rows)
    started = time.perf_counter()
    if done < rows.stop:
        _extract_rows(ctx, cfg, shards, proxy, omegas, partial, digest, rank, rows, done, device)
    seconds = time.perf_counter() - started
    metrics = {"mode": "precomputed", "levels": len(omegas), "images": len(shards), "resumed_from_row": done,
               "extract_seconds": round(seconds, 3)}
    if rows.stop > done:  # telemetry (spectralar.io.split_telemetry): the timing file and MLflow
        metrics["images_per_second"] = round((rows.stop - done) / seconds, 3)
    if world_size > 1:
        metrics.update(rank=rank, world_size=world_size, rows=[rows.start, rows.stop])
    if rank != 0:
        return metrics  # rank 0 assembles the table
    if not finished:
        _wait_for_ranks(ctx, partial, digest, len(shards), world_size)
        _finish(ctx, partial, manifest, shape, omegas)
    replace_directory(partial, out)  # renames only: no moment at which the finished table is lost
    return {**metrics, "table_bytes": (out / TABLE).stat().st_size}


def _extract_rows(ctx, cfg: ExtractProxyCodesConfig, shards: ImageShards, proxy: ProxyVQModel,
                  omegas: tuple[int, ...], partial: Path, digest: str, rank: int, rows: range, done: int,
                  device: torch.device) -> None:
    """Compute and write this rank's ``rows`` from ``done`` on, batch by batch, recording progress after each."""
    starts = range(done, rows.stop, cfg.batch_size)
    with _table_writer(partial / TABLE) as write_rows:
        for start in progress(starts, total=len(starts), desc="extract_proxy_codes", unit="batch", log_every=20,
                              logger=ctx.log):
            stop = min(start + cfg.batch_size, rows.stop)
            images = torch.from_numpy(shards.images(np.arange(start, stop))).permute(0, 3, 1, 2)  # (B, C, H, W)
            write_rows(start, codes_for_levels(proxy, to_float(images.to(device)), omegas, cfg.batch_size))
            write_json(partial / f"progress-{rank}.json",
                       {"digest": digest, "rows": [rows.start, rows.stop], "rows_done": stop})


@contextlib.contextmanager
def _table_writer(path: Path) -> Iterator:
    """``write_rows(first_row, block)``: the block's bytes at its rows of the .npy file, on disk on return.

    ``pwrite`` rather than a memory map: written pages then sit in the page cache, not in this
    process's resident set, so resident memory does not grow with the rows written."""
    offset = np.load(path, mmap_mode="r").offset  # the header's length: row-major data follows it
    descriptor = os.open(path, os.O_WRONLY)
    try:
        def write_rows(first_row: int, block: np.ndarray) -> None:
            os.pwrite(descriptor, np.ascontiguousarray(block).tobytes(), offset + first_row * block[0].nbytes)
            os.fdatasync(descriptor)  # progress is recorded only for rows that are on disk

        yield write_rows
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _locked(partial: Path) -> Iterator[None]:
    """Hold the partial directory's lock (ranks create, reset and finish the table one at a time)."""
    partial.mkdir(parents=True, exist_ok=True)
    with open(partial / LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _open_partial(partial: Path, manifest: dict, digest: str, shape: tuple[int, int, int]) -> bool:
    """Make sure ``partial`` holds a table for this manifest (creating it if needed); True when it is finished.

    A finished table whose final manifest is written but which a kill kept from being moved into
    place counts as done: it is moved, not recomputed. A table of another manifest is deleted."""
    with _locked(partial):
        final = partial / MANIFEST
        if final.is_file() and (partial / TABLE).is_file():
            written = read_manifest(final)
            same = all(written.get(key) == value for key, value in manifest.items())
            if same and written.get("shape") == list(shape):
                return True
        marker = partial / TABLE_DIGEST
        if (partial / TABLE).is_file() and marker.is_file() and marker.read_text() == digest:
            return False  # another rank, or a killed run, created it: keep its rows
        for path in partial.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        np.lib.format.open_memmap(partial / TABLE, mode="w+", dtype=np.uint16, shape=shape).flush()
        marker.write_text(digest)
        return False


def _rows_done(progress_file: Path, digest: str, rows: range) -> int:
    """Where this rank resumes: its last finished row, when its progress file is of this table and range."""
    if progress_file.is_file():
        state = read_json(progress_file)
        if state.get("digest") == digest and state.get("rows") == [rows.start, rows.stop]:
            return int(state["rows_done"])
    return rows.start


def _wait_for_ranks(ctx, partial: Path, digest: str, images: int, world_size: int) -> None:
    """Rank 0: block until every rank's rows are written (a rank that died can be rerun meanwhile)."""
    waiting_since = time.monotonic()
    while True:
        missing = [rank for rank in range(world_size)
                   if _rows_done(partial / f"progress-{rank}.json", digest, shard_rows(images, rank, world_size))
                   < shard_rows(images, rank, world_size).stop]
        if not missing:
            return
        if time.monotonic() - waiting_since > 60:
            ctx.log.info("waiting for the rows of ranks %s", missing)
            waiting_since = time.monotonic()
        time.sleep(WAIT_SECONDS)


def _finish(ctx, partial: Path, manifest: dict, shape: tuple[int, int, int], omegas: tuple[int, ...]) -> None:
    """Checksum the complete table and write its final manifest, so that ``partial`` can be moved into place."""
    with _locked(partial):
        # what load_proxy_codes checks: shape, dtype, size and sha256 (ImageNet's 64 levels: 42 GB, ~45 s at the
        # sha256 rate measured in spectralar/io.py, small beside the extraction itself)
        record = array_record(partial / TABLE, np.load(partial / TABLE, mmap_mode="r"))
        # the final manifest first: from here on a killed run finds a finished table (see _open_partial)
        write_manifest(partial / MANIFEST, {**manifest, "table": TABLE, "shape": list(shape), "files": {TABLE: record}})
        ctx.write_config(partial, omegas=list(omegas))
        for path in [*partial.glob("progress-*.json"), partial / TABLE_DIGEST]:
            path.unlink(missing_ok=True)
    (partial / LOCK).unlink(missing_ok=True)
    os.chmod(partial, 0o755)
