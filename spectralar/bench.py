"""Benchmarks (not tests): ``python -m spectralar.bench <what> [...]``.

  tokenizer  training images/s and model FLOPs utilisation of a tokenizer stage-1 step (forward,
             backward, AdamW) for the default config or TiTok-B64 (--config b64), on a device
  generator  training tokens/s and MFU of the generator (forward, backward, AdamW on random tokens) and
             sampling images/s with and without the KV cache, for the default config or the paper's
             d16 / d20 / d24 / d16-p4 (--config), on a device
  read   prepare throughput and shard read throughput for JPEG shards at a given resolution, on a
         synthetic photo-like ImageFolder (or an existing prepared dataset with --data), plus the
         bytes per image and the extrapolated size of ImageNet's 1,281,167 training images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

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


def _vit_flops_per_sample(blocks: torch.nn.Module, depth: int, width: int, tokens: int) -> float:
    from spectralar.training import model_flops_per_sample

    params = sum(p.numel() for p in blocks.parameters())
    return model_flops_per_sample(params, tokens, layers=depth, width=width)


def _model_configs(params_file: str | Path):
    """(tokenizer, generator) configs of a params file, completed as the pipeline's stages complete
    them: image shape and classes from the prepared manifest when ``data/prepared`` holds one, else
    the dataset's known shape (Fashion-MNIST: 1 channel, 10 classes; an ImageFolder: RGB, 1000 classes)."""
    from spectralar.artifacts import generator_config_for, tokenizer_config_for
    from spectralar.config import load_params
    from spectralar.data.shards import ImageShards

    params = load_params(params_file)
    try:
        train = ImageShards("data/prepared", "train")
        shape, classes = train.image_shape, train.num_classes
    except (FileNotFoundError, ValueError):
        gray = params.data.source == "fashion_mnist"
        shape, classes = (params.data.resolution, params.data.resolution, 1 if gray else 3), 10 if gray else 1000
    tokenizer = tokenizer_config_for(params.tokenizer, shape, params.proxy.codebook_size)
    tokens = {"vocab": tokenizer.codebook_size, "num_tokens": tokenizer.num_tokens, "num_classes": classes}
    return tokenizer, generator_config_for(params.generator, tokens)


def bench_tokenizer(args: argparse.Namespace) -> dict:
    from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
    from spectralar.training import autocast, build_adamw, mfu, peak_flops, resolve_device

    cfg = TokenizerConfig.titok_b64() if args.config == "b64" else _model_configs(args.params)[0]
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(cfg).to(device)
    optimizer = build_adamw(model, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    codes = torch.randint(0, cfg.proxy_codebook_size, (args.batch, cfg.grid_size, cfg.grid_size), device=device)
    prefix = torch.randint(1, cfg.num_tokens + 1, (args.batch,), device=device)

    def step() -> None:
        with autocast(device, True):
            logits, _, vq = model(x, prefix)
        loss = torch.nn.functional.cross_entropy(logits.float(), codes) + vq
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = args.steps * args.batch / (time.perf_counter() - start)
    tokens = cfg.num_patches + cfg.num_tokens
    flops = (_vit_flops_per_sample(model.encoder.blocks, cfg.encoder_depth, cfg.width, tokens)
             + _vit_flops_per_sample(model.decoder.blocks, cfg.decoder_depth, cfg.width, tokens))
    utilisation = mfu(flops, rate, peak_flops(device))
    return {
        "config": args.config, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": args.batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_second": round(rate, 1),
        "model_tflops_per_image": round(flops / 1e12, 4),
        "achieved_tflops": round(flops * rate / 1e12, 3),
        "mfu": None if utilisation is None else round(utilisation, 4),
    }


GENERATOR_CONFIGS = ("default", "d16", "d20", "d24", "d16_p4")



def generator_training(config, device: str | torch.device = "cpu", batch: int = 64, steps: int = 10,
              warmup: int = 2, bf16: bool = True, peak: Optional[float] = None) -> dict:
    """Training throughput of the generator on random tokens: forward, backward and AdamW per step.

    Returns tokens/s, images/s, parameters, FLOPs per image and MFU (None on CPU unless ``peak``,
    the device's peak FLOP/s, is given).
    """
    from spectralar.models.generator import SpectralGPT
    from spectralar.stages.train_generator import TeacherForced, flops_per_image
    from spectralar.training import autocast, build_adamw, mfu, peak_flops, synchronize

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    model = SpectralGPT(config).to(device).train()
    net = TeacherForced(model)
    optimizer = build_adamw(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    ids_BN = torch.randint(0, config.vocab_size, (batch, config.num_tokens), generator=generator).to(device)
    labels_B = torch.randint(0, config.num_classes + 1, (batch,), generator=generator).to(device)

    def one_step() -> None:
        with autocast(device, bf16):
            logits_BNV = net(ids_BN, labels_B)
        loss = F.cross_entropy(logits_BNV.float().flatten(0, 1), ids_BN.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        one_step()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    images_per_second = batch * steps / (time.perf_counter() - begin)
    flops = flops_per_image(model)
    utilisation = mfu(flops, images_per_second, peak_flops(device, peak))
    return {"device": str(device), "batch": batch, "steps": steps,
            "parameters": sum(p.numel() for p in model.parameters()),
            "images_per_second": round(images_per_second, 1),
            "tokens_per_second": round(images_per_second * config.num_tokens, 1),
            "flops_per_image": flops, "mfu": None if utilisation is None else round(utilisation, 4)}



def generator_sampling(config, device: str | torch.device = "cpu", batch: int = 64,
                       repeats: int = 2, cfg_scale: float = 1.5) -> dict:
    """Generation images/s of a randomly initialised generator with and without the KV cache."""
    from spectralar.models.generator import SpectralGPT
    from spectralar.models.sampling import cyclic_labels, generate
    from spectralar.training import synchronize

    device = torch.device(device)
    torch.manual_seed(0)
    model = SpectralGPT(config).to(device).eval()
    labels = cyclic_labels(config.num_classes, -(-batch // config.num_classes))[:batch].to(device)
    result: dict = {"device": str(device), "batch": batch, "num_tokens": config.num_tokens,
                    "parameters": sum(p.numel() for p in model.parameters())}
    for cached in (True, False):
        generator = torch.Generator(device).manual_seed(0)
        generate(model, labels, cfg_scale=cfg_scale, generator=generator, use_kv_cache=cached)  # warm-up
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(repeats):
            generate(model, labels, cfg_scale=cfg_scale, generator=generator, use_kv_cache=cached)
        synchronize(device)
        rate = batch * repeats / (time.perf_counter() - begin)
        result["images_per_second_" + ("kv_cache" if cached else "no_cache")] = round(rate, 1)
    result["kv_cache_speedup"] = round(result["images_per_second_kv_cache"] / result["images_per_second_no_cache"], 2)
    return result


def bench_generator(args: argparse.Namespace) -> dict:
    """Training and sampling throughput of one generator config; both from randomly initialised weights
    (speed does not depend on the weights). The cached sampler must beat full recompute (issue 4)."""
    from spectralar.models.generator import GeneratorConfig
    from spectralar.training import resolve_device

    if args.config == "default":
        cfg = _model_configs(args.params)[1]
    else:
        cfg = getattr(GeneratorConfig, args.config)()
    if args.num_tokens:
        cfg = dataclasses.replace(cfg, num_tokens=args.num_tokens)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"config": args.config, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "num_tokens": cfg.num_tokens,
              "tokens_per_step": cfg.tokens_per_step}
    train = generator_training(cfg, device, batch=args.batch, steps=args.steps, warmup=args.warmup, bf16=not args.fp32,
                      peak=args.peak_flops)
    result["train"] = {k: train[k] for k in ("batch", "steps", "parameters", "images_per_second",
                                             "tokens_per_second", "flops_per_image", "mfu")}
    if args.sample_batch:
        result["sample"] = generator_sampling(cfg, device, batch=args.sample_batch, repeats=args.sample_repeats)
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
    tok = sub.add_parser("tokenizer", help="tokenizer training throughput and MFU")
    tok.add_argument("--config", choices=("default", "b64"), default="default")
    tok.add_argument("--params", default="params.yaml", help="params file for --config default")
    tok.add_argument("--device", default="auto")
    tok.add_argument("--batch", type=int, default=64)
    tok.add_argument("--steps", type=int, default=10)
    tok.add_argument("--warmup", type=int, default=3)
    gen = sub.add_parser("generator", help="generator training tokens/s + MFU, sampling images/s with/without KV cache")
    gen.add_argument("--config", choices=GENERATOR_CONFIGS, default="default")
    gen.add_argument("--params", default="params.yaml", help="params file for --config default")
    gen.add_argument("--num-tokens", type=int, default=0,
                     help="sequence length N instead of the config's (e.g. 64, the paper's, for the default model)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--batch", type=int, default=128, help="training batch per step")
    gen.add_argument("--steps", type=int, default=10)
    gen.add_argument("--warmup", type=int, default=3)
    gen.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    gen.add_argument("--peak-flops", type=float, default=None,
                     help="peak FLOP/s of the device for MFU (CUDA: looked up by name when omitted)")
    gen.add_argument("--sample-batch", type=int, default=100, help="images per sampling call (0 = skip sampling)")
    gen.add_argument("--sample-repeats", type=int, default=2)
    args = parser.parse_args()
    runners = {"read": bench_read, "tokenizer": bench_tokenizer, "generator": bench_generator}
    print(json.dumps(runners[args.what](args), indent=2))


if __name__ == "__main__":
    main()
