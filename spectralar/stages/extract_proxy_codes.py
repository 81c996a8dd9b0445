"""extract_proxy_codes: proxy codes of every spectral level's target I'_i for every training image.

Tokenizer stage 1 supervises the decoder from prefix s_1..s_i with the proxy codes of the
band-limited image I'_i = IDCT(DCT(I) ∘ 1_{ω_i}) (eq. 5, Algorithm 1). This stage precomputes them
as a uint16 table (images, levels, h*w), streamed to disk in batches and resumable: a killed run
continues from the last finished batch. With ``mode: online`` it writes no table and
train_tokenizer computes the codes of the sampled level on the fly (README: when to use which).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from spectralar.artifacts import MANIFEST, PROXY_CODES_TABLE as TABLE, load_proxy, proxy_code_levels, \
    tokenizer_config_for
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.io import atomic_path, read_json, replace_directory, sha256_file, write_json
from spectralar.log import progress
from spectralar.models.proxy_vq import ProxyVQModel
from spectralar.spectral import band_limit
from spectralar.stages.common import stage_device


@dataclass(frozen=True)
class ExtractProxyCodesConfig:
    mode: Literal["precomputed", "online"] = "precomputed"
    batch_size: int = 500  # images per batch (each expands to one proxy pass per level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--proxy", default="models/proxy/proxy.pt", help="proxy model file")
    parser.add_argument("--out", default="data/proxy_codes", help="output directory")


@torch.no_grad()
def codes_for_levels(proxy: ProxyVQModel, images_BCHW: torch.Tensor, omegas: tuple[int, ...]) -> torch.Tensor:
    """Proxy codes (B, L, h*w) of the band-limited images for every ω in ``omegas``."""
    batch = images_BCHW.shape[0]
    expanded = images_BCHW.repeat_interleave(len(omegas), dim=0)  # (B*L, C, H, W), level fastest
    omega_BL = torch.tensor(omegas, device=images_BCHW.device).repeat(batch)  # (B*L,)
    targets = band_limit(expanded, omega_BL)
    ids = proxy.encode_ids(targets)  # (B*L, h, w)
    return ids.reshape(batch, len(omegas), -1)


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
            write_json(tmp / MANIFEST, manifest)
            ctx.write_config(tmp)
        return {"mode": "online", "levels": len(omegas), "images": len(shards)}
    device = stage_device(ctx.params.run.device)
    proxy = load_proxy(proxy_path, device)
    positions = proxy.config.grid_size ** 2
    if proxy.config.codebook_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"proxy codebook of {proxy.config.codebook_size} codes does not fit uint16")
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    partial = out.with_name(out.name + ".partial")  # not a declared output: survives DVC's clean-up
    done = _open_partial(partial, manifest, digest, (len(shards), len(omegas), positions))
    table = np.lib.format.open_memmap(partial / TABLE, mode="r+")
    starts = range(done, len(shards), cfg.batch_size)
    for start in progress(starts, total=len(starts), desc="extract_proxy_codes", unit="batch", log_every=20,
                          logger=ctx.log):
        stop = min(start + cfg.batch_size, len(shards))
        images = torch.from_numpy(shards.images(np.arange(start, stop))).permute(0, 3, 1, 2)
        table[start:stop] = codes_for_levels(proxy, to_float(images.to(device)), omegas).cpu().numpy()
        table.flush()
        write_json(partial / "progress.json", {"digest": digest, "rows_done": stop})
    del table
    # the final manifest first: from here on a killed run finds a finished table (see _open_partial)
    write_json(partial / MANIFEST, {**manifest, "table": TABLE, "shape": [len(shards), len(omegas), positions]})
    ctx.write_config(partial, omegas=list(omegas))
    (partial / "progress.json").unlink(missing_ok=True)
    os.chmod(partial, 0o755)
    replace_directory(partial, out)  # renames only: no moment at which the finished table is lost
    size = (out / TABLE).stat().st_size
    return {"mode": "precomputed", "levels": len(omegas), "images": len(shards), "table_bytes": size,
            "resumed_from_row": done}


def _open_partial(partial: Path, manifest: dict, digest: str, shape: tuple[int, int, int]) -> int:
    """Return the number of rows already done in a matching partial table (creating it if needed).

    A finished table whose final manifest is written but which a kill kept from being moved into
    place counts as done: it is moved, not recomputed."""
    final = partial / MANIFEST
    if final.is_file() and (partial / TABLE).is_file():
        written = read_json(final)
        if all(written.get(key) == value for key, value in manifest.items()) and written.get("shape") == list(shape):
            return shape[0]
    progress_file = partial / "progress.json"
    if progress_file.is_file() and (partial / TABLE).is_file():
        state = read_json(progress_file)
        if state.get("digest") == digest:
            return int(state["rows_done"])
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    np.lib.format.open_memmap(partial / TABLE, mode="w+", dtype=np.uint16, shape=shape).flush()
    write_json(progress_file, {"digest": digest, "rows_done": 0})
    return 0
