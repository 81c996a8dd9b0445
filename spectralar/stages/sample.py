"""sample: class-conditional generation, truncated generation and spectrum completion (paper §3.3, §4.4).

Samples are drawn with the KV-cached sampler (``spectralar.models.sampling.generate``): classifier-free
guidance on a doubled batch with VAR's linear ramp, then temperature, top-k, top-p, all from one
seeded generator. ``compile: true`` runs the samples' steps through ``torch.compile`` over a static KV
cache (on a GPU as CUDA graphs), traced once per batch size (the last, smaller batch traces again); the
same tokens as the eager sampler up to float rounding in fused kernels. Completion and super-resolution
(a few images) stay eager. Class order is cyclic (0, 1, ..., C-1, 0, 1, ...), never sorted: ADM's evaluator
computes IS over the file in order (ADM's evaluator does not shuffle). Outputs under ``--out`` (one directory, atomic):

- ``samples.npz``: ``arr_0`` uint8 (S, H, W, C) in ADM's layout, ``labels`` int64, ``ids`` uint16 (S, N).
- ``truncated/samples_drop{k}.npz`` for each k > 0 in ``sample.truncate``: the same samples decoded from
  their first N-k tokens (Table 3). ``generate(num_tokens=N-k)`` with the same seed draws exactly that
  prefix (the guidance ramp spans all N steps either way), so the prefix of the full run is decoded.
- ``grid.png`` (one row per class) and ``grid_<index>_<class>.png`` per class.
- ``progression.png`` / ``progression.gif``: a few samples decoded from 1, 2, ..., N tokens (coarse to fine).
- ``completion.png``: spectrum completion. One val image per class is tokenized, its first
  ``completion_prefix`` tokens kept and the rest generated; rows: input (decoded prefix), completion,
  tokenizer reconstruction (all N tokens), original.
- ``superres.png`` and ``superres_{upsample,stride,patch}.npz`` (§4.4, Table 3; when
  ``superres_samples`` > 0): the first samples at 2x resolution. Baseline: bilinear upsampling.
  Stride / Patch: 4 sub-images (pixels (2i+a, 2j+b), or the 4 quadrants) are upsampled to H x W,
  their spectrum completed from the first ``completion_prefix`` tokens, and reassembled.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from spectralar.artifacts import CONFIG, SAMPLES_FILE, TRUNCATED_DIR, load_codec, load_generator, truncated_name
from spectralar.config import ConfigError, require
from spectralar.data.loader import to_float, to_uint8
from spectralar.data.shards import ImageShards
from spectralar.evaluation.measures import psnr
from spectralar.io import atomic_path, sha256_file
from spectralar.log import progress
from spectralar.models.codec import SpectralCodec, decode_uint8
from spectralar.models.generator import SpectralGPT
from spectralar.models.sampling import cyclic_labels, generate
from spectralar.stages.common import stage_device
from spectralar.training import synchronize



@dataclass(frozen=True)
class SampleConfig:
    num_per_class: int = 100
    batch_size: int = 250
    cfg_scale: float = 1.5  # VAR's FID setting
    cfg_schedule: Literal["constant", "linear"] = "linear"  # linear: VAR's ramp from 0 to cfg_scale
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (VAR: 900 of 4096 codes)
    top_p: float = 0.0  # 0 = off (VAR: 0.96)
    truncate: tuple[int, ...] = (0, 2, 4)  # Table 3: last k tokens dropped; 0 = samples.npz itself
    progression_samples: int = 4  # samples shown decoded from 1..N tokens (0 = no figure)
    completion_prefix: int = 4  # tokens kept in spectrum completion (and super-resolution)
    superres_samples: int = 10  # samples super-resolved 2x, Stride and Patch (0 = off)
    compile: bool = False  # the samples' steps through torch.compile over a static KV cache (CUDA graphs on a GPU)

    def __post_init__(self) -> None:
        require(self, "num_per_class", "batch_size", "completion_prefix", at_least=1)
        require(self, "cfg_scale", at_least=0, meaning="0 = no guidance")
        require(self, "temperature", above=0)
        require(self, "top_k", at_least=0, meaning="0 = off")
        require(self, "top_p", at_least=0, at_most=1, meaning="0 = off")
        require(self, "truncate", at_least=0, meaning="0 = the full sequence")
        require(self, "progression_samples", "superres_samples", at_least=0, meaning="0 = no figure")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default="models/generator/generator.pt", help="trained generator file")
    parser.add_argument("--tokenizer", default="models/tokenizer/tokenizer.pt", help="trained tokenizer file")
    parser.add_argument("--data", default="data/prepared", help="prepared dataset (val images for completion)")
    parser.add_argument("--out", default="samples", help="output directory")


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

def check_pair(model: SpectralGPT, codec: SpectralCodec, cfg: SampleConfig) -> None:
    n = model.config.num_tokens
    if (n, model.config.vocab_size) != (codec.num_tokens, codec.tokenizer.config.codebook_size):
        raise ValueError(f"generator (N={n}, vocab {model.config.vocab_size}) does not match the tokenizer "
                         f"(N={codec.num_tokens}, vocab {codec.tokenizer.config.codebook_size})")
    bad = [k for k in cfg.truncate if k >= n]
    if bad:
        raise ConfigError(f"sample.truncate: {bad[0]} tokens dropped leaves nothing of N={n}")
    if cfg.completion_prefix >= n:
        raise ConfigError(f"sample.completion_prefix: {cfg.completion_prefix} must be < N={n}")


def sample_ids(model: SpectralGPT, labels: torch.Tensor, cfg: SampleConfig, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, float]:
    """Token ids (S, N) for ``labels`` in batches, and the seconds spent generating."""
    chunks, seconds = [], 0.0
    for start in progress(range(0, len(labels), cfg.batch_size), desc="sample", unit="batch", log_every=10):
        labels_B = labels[start:start + cfg.batch_size].to(device)
        begin = time.perf_counter()
        chunks.append(generate(model, labels_B, cfg_scale=cfg.cfg_scale, cfg_schedule=cfg.cfg_schedule,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               generator=generator, use_kv_cache=True, compiled=cfg.compile))
        synchronize(device)
        seconds += time.perf_counter() - begin
    return torch.cat(chunks), seconds


@torch.no_grad()
def complete_spectrum(model: SpectralGPT, codec: SpectralCodec, images_BCHW: torch.Tensor, labels_B: torch.Tensor,
                      cfg: SampleConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """§4.4: keep the first k tokens of each image (its low frequencies), generate the rest.

    Returns the completed ids (B, N) and images (B, C, H, W): the decoded prefix ("input"), the
    completion, the tokenizer's reconstruction from all N tokens and the original.
    """
    ids_BN = codec.encode(images_BCHW)
    prefix_Bk = ids_BN[:, :cfg.completion_prefix]
    completed_BN = generate(model, labels_B, prefix_ids=prefix_Bk, cfg_scale=cfg.cfg_scale,
                            cfg_schedule=cfg.cfg_schedule, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, generator=generator, use_kv_cache=True)
    return {"ids": completed_BN, "input": codec.decode(prefix_Bk), "completion": codec.decode(completed_BN),
            "reconstruction": codec.decode(ids_BN), "original": images_BCHW}


SUBIMAGE_MODES = ("stride", "patch")


def split_subimages(images_BCHW: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H/2, W/2): pixels (2i+a, 2j+b) ("stride") or quadrants ("patch"),
    sub-image index 2a + b."""
    B, C, H, W = images_BCHW.shape
    if mode == "stride":
        parts = [images_BCHW[..., a::2, b::2] for a in (0, 1) for b in (0, 1)]
    elif mode == "patch":
        parts = [images_BCHW[..., a * H // 2:(a + 1) * H // 2, b * W // 2:(b + 1) * W // 2] for a in (0, 1) for b in (0, 1)]
    else:
        raise ValueError(f"mode must be one of {SUBIMAGE_MODES}, got {mode!r}")
    return torch.stack(parts, dim=1)  # (B, 4, C, H/2, W/2)


def merge_subimages(subs_B4CHW: torch.Tensor, mode: str) -> torch.Tensor:
    """Inverse of :func:`split_subimages`: (B, 4, C, h, w) -> (B, C, 2h, 2w)."""
    B, _, C, h, w = subs_B4CHW.shape
    out_BCHW = subs_B4CHW.new_empty((B, C, 2 * h, 2 * w))
    for a in (0, 1):
        for b in (0, 1):
            if mode == "stride":
                out_BCHW[..., a::2, b::2] = subs_B4CHW[:, 2 * a + b]
            elif mode == "patch":
                out_BCHW[..., a * h:(a + 1) * h, b * w:(b + 1) * w] = subs_B4CHW[:, 2 * a + b]
            else:
                raise ValueError(f"mode must be one of {SUBIMAGE_MODES}, got {mode!r}")
    return out_BCHW


def super_resolve(model: SpectralGPT, codec: SpectralCodec, images_BCHW: torch.Tensor, labels_B: torch.Tensor,
                  mode: str, cfg: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """§4.4: 2x super-resolution (B, C, 2H, 2W) by spectrum completion of 4 upsampled sub-images."""
    B, C, H, W = images_BCHW.shape
    subs = split_subimages(images_BCHW, mode).flatten(0, 1)  # (4B, C, H/2, W/2)
    upsampled = F.interpolate(subs, size=(H, W), mode="bilinear", align_corners=False).clamp(-1, 1)
    refined = complete_spectrum(model, codec, upsampled, labels_B.repeat_interleave(4), cfg, generator)
    return merge_subimages(refined["completion"].view(B, 4, C, H, W), mode)  # (B, C, 2H, 2W)


# ------------------------------------------------------------------------------------------------
# Figures (Pillow only, its default font: byte-identical reruns)
# ------------------------------------------------------------------------------------------------

TEXT_SIZE = 12  # points of Pillow's default font (FreeType) in every label
TEXT_MARGIN = 6  # pixels between a label and the images


def _font(size: int = TEXT_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def label(picture, cell: tuple[int, int], offset: tuple[int, int], row_titles=(), column_titles=(),
          title: Optional[str] = None):
    """``picture`` on a white canvas with a title above, a title left of each row and above each
    column. ``cell`` is the (width, height) of one image with its padding, ``offset`` where the first
    image starts, in ``picture``'s pixels: the titles are centred on the rows and columns."""
    from PIL import Image, ImageDraw

    font = _font()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    line = _text_size(measure, "Ag", font)[1] + TEXT_MARGIN
    left = max((_text_size(measure, t, font)[0] for t in row_titles), default=-TEXT_MARGIN) + 2 * TEXT_MARGIN
    top = (line if title else 0) + (line if column_titles else 0)
    width = max(left + picture.width, _text_size(measure, title, font)[0] + 2 * TEXT_MARGIN if title else 0)
    canvas = Image.new(picture.mode, (width, top + picture.height), 255)
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if picture.mode == "L" else (0, 0, 0)
    if title:
        draw.text((TEXT_MARGIN, TEXT_MARGIN // 2), title, font=font, fill=ink)
    for r, text in enumerate(row_titles):
        text_width, text_height = _text_size(draw, text, font)
        middle = top + offset[1] + r * cell[1] + (cell[1] - offset[1]) // 2
        draw.text((left - TEXT_MARGIN - text_width, middle - text_height // 2), text, font=font, fill=ink)
    for c, text in enumerate(column_titles):
        text_width, _ = _text_size(draw, text, font)
        middle = left + offset[0] + c * cell[0] + (cell[0] - offset[0]) // 2
        draw.text((middle - text_width // 2, top - line + TEXT_MARGIN // 2), text, font=font, fill=ink)
    return canvas


def tile(images_NHWC: np.ndarray, columns: int, scale: int = 2, pad: int = 2, row_titles=(), column_titles=(),
         title: Optional[str] = None):
    """A Pillow image of uint8 (N, H, W, C) images in rows of ``columns``, upscaled ``scale``x, with
    optional titles (:func:`label`)."""
    from PIL import Image

    n, h, w, c = images_NHWC.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images_NHWC):
        r, col = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if not (row_titles or column_titles or title):
        return picture
    return label(picture, ((w + pad) * scale, (h + pad) * scale), (pad * scale, pad * scale), row_titles,
                 column_titles, title)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


GRID_CLASSES = 16  # classes shown in the figures: all of Fashion-MNIST's 10, 16 spread over ImageNet's 1000


def grid_classes(num_classes: int, limit: int = GRID_CLASSES) -> list[int]:
    """At most ``limit`` class indices spread evenly over 0..num_classes-1 (all when there are few)."""
    if num_classes <= limit:
        return list(range(num_classes))
    return sorted({round(i * (num_classes - 1) / (limit - 1)) for i in range(limit)})


def write_grids(directory: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                per_row: int = 8) -> None:
    """grid.png: a row of samples per shown class, named on the left; grid_<index>_<class>.png: up to
    8 rows of one class under its name.

    Only :func:`grid_classes` are drawn, so a 1000-class run writes 16 small figures, not a
    half-million-pixel-tall one; every sample is in samples.npz regardless.
    """
    shown = [c for c in grid_classes(len(class_names)) if (labels == c).any()]
    rows = [images[labels == c][:per_row] for c in shown]
    width = min(len(r) for r in rows)
    tile(np.concatenate([r[:width] for r in rows]), width, row_titles=[class_names[c] for c in shown]
         ).save(directory / "grid.png")
    for index in shown:
        own = images[labels == index][:per_row * per_row]
        tile(own, min(per_row, len(own)), title=f"{class_names[index]} (class {index})"
             ).save(directory / f"grid_{index}_{slug(class_names[index])}.png")


VISIBLE_CHANGE = 2.0  # mean |difference| in uint8 levels below which two decoded prefixes look the same


def first_visible_prefix(frames: list[np.ndarray], threshold: float = VISIBLE_CHANGE) -> int:
    """Index of the first frame that any sample visibly changes after: the leading frames before it
    look the same as their successor (the first tokens of a sample often all decode to the same
    near-uniform grey), so an animation starting there opens on the first change, not on a still.
    ``frames[i]`` is the (B, H, W, C) decoding of the first i + 1 tokens; the last frame always shows."""
    for i in range(len(frames) - 1):
        change = np.abs(frames[i + 1].astype(np.int16) - frames[i].astype(np.int16))  # (B, H, W, C)
        if change.reshape(len(change), -1).mean(axis=1).max() >= threshold:
            return i
    return len(frames) - 1


@torch.no_grad()
def write_progression(directory: Path, codec: SpectralCodec, ids_BN: torch.Tensor) -> None:
    """Decoded prefixes 1..N of a few samples: a PNG (row = sample, column = prefix, its token count
    above) and a GIF from :func:`first_visible_prefix` on, the token count on each frame."""
    n = ids_BN.shape[1]
    frames = [decode_uint8(codec, ids_BN[:, :i], len(ids_BN)) for i in range(1, n + 1)]  # N x (B, H, W, C)
    by_sample = np.stack(frames, axis=1).reshape(-1, *frames[0].shape[1:])  # (B*N, H, W, C) row-major
    tile(by_sample, n, column_titles=[str(i) for i in range(1, n + 1)],
         title="tokens decoded (coarse to fine), one sample per row").save(directory / "progression.png")
    start = first_visible_prefix(frames)
    strips = [tile(frames[i], len(frames[i]), scale=4, title=f"{i + 1} / {n} tokens") for i in range(start, n)]
    durations = [300] * (len(strips) - 1) + [1500]  # hold the finished image
    strips[0].save(directory / "progression.gif", save_all=True, append_images=strips[1:], duration=durations,
                   loop=0)


COMPLETION_ROWS = ("input", "completion", "reconstruction", "original")


def completion_row_titles(prefix: int, num_tokens: int) -> list[str]:
    return [f"first {prefix} tokens", f"completed to {num_tokens}", f"all {num_tokens} tokens", "original"]


def write_completion(directory: Path, completion: dict[str, torch.Tensor], prefix: int, num_tokens: int) -> None:
    """completion.png: a column per shown class, rows titled as :data:`COMPLETION_ROWS`."""
    rows = [to_uint8(completion[key]).permute(0, 2, 3, 1).cpu().numpy() for key in COMPLETION_ROWS]
    tile(np.concatenate(rows), len(rows[0]), row_titles=completion_row_titles(prefix, num_tokens),
         title="spectrum completion, one val image per class").save(directory / "completion.png")


SUPERRES_TITLES = {"upsample": "bilinear 2x", "stride": "Stride (ours)", "patch": "Patch (ours)"}


def write_superres(directory: Path, model: SpectralGPT, codec: SpectralCodec, images_BHWC: np.ndarray,
                   labels_B: torch.Tensor, cfg: SampleConfig, seed: int, device: torch.device) -> None:
    """superres_{upsample,stride,patch}.npz (ADM layout) and superres.png (a row per method, named)."""
    x = to_float(torch.from_numpy(images_BHWC).permute(0, 3, 1, 2).to(device))  # (B, C, H, W)
    results = {"upsample": F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)}
    for mode in SUBIMAGE_MODES:
        generator = torch.Generator(device).manual_seed(seed)
        results[mode] = super_resolve(model, codec, x, labels_B.to(device), mode, cfg, generator)
    rows = []
    for name, images in results.items():
        array = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        np.savez(directory / f"superres_{name}.npz", arr_0=array, labels=labels_B.numpy().astype(np.int64))
        rows.append(array)
    tile(np.concatenate(rows), len(images_BHWC), row_titles=[SUPERRES_TITLES[name] for name in results]
         ).save(directory / "superres.png")


def completion_inputs(shards: ImageShards, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first val image of each shown class (:func:`grid_classes`) that has one: images uint8
    (B, C, H, W), labels (B,)."""
    index = [int(np.flatnonzero(shards.labels == c)[0]) for c in grid_classes(num_classes)
             if (shards.labels == c).any()]
    images = torch.from_numpy(shards.images(np.asarray(index))).permute(0, 3, 1, 2)
    return images, torch.from_numpy(shards.labels[index])


# ------------------------------------------------------------------------------------------------
# Stage
# ------------------------------------------------------------------------------------------------

def _load(ctx, device: torch.device) -> tuple[SpectralGPT, SpectralCodec, dict]:
    model, extra = load_generator(ctx.args.generator, device)
    codec = load_codec(ctx.args.tokenizer, device)
    check_pair(model, codec, ctx.params.sample)
    trained_on = extra.get("tokenizer_sha256")
    if trained_on and trained_on != sha256_file(ctx.args.tokenizer):
        raise ValueError(f"{ctx.args.generator} was trained on the tokens of another tokenizer than "
                         f"{ctx.args.tokenizer}: rerun dump_tokens and train_generator")
    return model, codec, extra


def run(ctx) -> dict:
    cfg: SampleConfig = ctx.params.sample
    device = stage_device(ctx.params.run.device)
    model, codec, extra = _load(ctx, device)
    n, num_classes = model.config.num_tokens, model.config.num_classes
    class_names = list(extra.get("class_names") or [str(c) for c in range(num_classes)])
    labels = cyclic_labels(num_classes, cfg.num_per_class)
    generator = torch.Generator(device).manual_seed(ctx.params.run.seed)
    ids, generate_seconds = sample_ids(model, labels, cfg, generator, device)
    begin = time.perf_counter()
    images = decode_uint8(codec, ids, cfg.batch_size)
    decode_seconds = time.perf_counter() - begin
    labels_np = labels.numpy().astype(np.int64)
    ctx.log.info("generated %d samples: %.1f images/s (KV cache), decoding %.1f images/s", len(ids),
                 len(ids) / generate_seconds, len(ids) / decode_seconds)
    val_images, val_labels = completion_inputs(ImageShards(ctx.args.data, "val"), num_classes)
    completion = complete_spectrum(model, codec, to_float(val_images.to(device)), val_labels.to(device), cfg,
                                   torch.Generator(device).manual_seed(ctx.params.run.seed + 1))
    out = Path(ctx.args.out)
    with atomic_path(out, directory=True) as tmp:
        np.savez(tmp / SAMPLES_FILE, arr_0=images, labels=labels_np, ids=ids.cpu().numpy().astype(np.uint16))
        dropped = sorted({k for k in cfg.truncate if k > 0})
        if dropped:
            (tmp / TRUNCATED_DIR).mkdir()
        for k in dropped:
            np.savez(tmp / TRUNCATED_DIR / truncated_name(k), arr_0=decode_uint8(codec, ids[:, :n - k], cfg.batch_size),
                     labels=labels_np)
        write_grids(tmp, images, labels_np, class_names)
        if cfg.progression_samples:
            write_progression(tmp, codec, ids[:cfg.progression_samples])
        write_completion(tmp, completion, cfg.completion_prefix, n)
        if cfg.superres_samples:
            write_superres(tmp, model, codec, images[:cfg.superres_samples], labels[:cfg.superres_samples], cfg,
                           ctx.params.run.seed + 2, device)
        ctx.write_config(tmp, num_samples=len(ids), class_names=class_names, num_tokens=n)
    ctx.log_outputs(out, ("grid.png", "progression.png", "progression.gif", "completion.png", "superres.png",
                          CONFIG))
    return {
        "num_samples": len(ids),
        "images_per_second": round(len(ids) / generate_seconds, 1),  # generation with KV cache
        "decode_images_per_second": round(len(ids) / decode_seconds, 1),
        "truncate": list(cfg.truncate),
        "completion_prefix": cfg.completion_prefix,
        "completion_psnr_input": round(float(psnr(completion["input"], completion["original"]).mean()), 3),
        "completion_psnr": round(float(psnr(completion["completion"], completion["original"]).mean()), 3),
        "completion_psnr_reconstruction": round(float(psnr(completion["reconstruction"], completion["original"]).mean()), 3),
    }
