"""Benchmarks (not tests): ``python -m spectralar.bench <what> [...]``.

  tokenizer  training images/s and model FLOPs utilisation of a tokenizer stage-1 step (forward,
             backward, AdamW) for the default config or TiTok-B64 (--config b64), on a device
  generator  training tokens/s and MFU of the generator (forward, backward, AdamW on random tokens) and
             sampling images/s: the KV-cached sampler, full recompute and the floor (one teacher-forced
             forward of the whole sequence over the same rows), for the default config or the paper's
             d16 / d20 / d24 / d16-p4 (--config) and a width-512, depth-8, 64-token variant of it, at
             1 and 2 CPU threads (--threads), on a device
  tokenizer-quality
             where a trained tokenizer's reconstruction quality goes: every prefix against its target I'_i
             and the image, beside the DCT ceiling, the equal-bits PCA code and the proxy's ceiling, plus
             codebook usage, the reconstructions' class accuracy and rFID under the domain classifier
             (the same computation as the evaluate stage's reconstruction table)
  read   prepare throughput and shard read throughput for JPEG shards at a given resolution, on a
         synthetic photo-like ImageFolder (or an existing prepared dataset with --data), plus the
         bytes per image and the extrapolated size of ImageNet's 1,281,167 training images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

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
    from spectralar.io import write_manifest
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
            write_manifest(data / "manifest.json", manifest)
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
            **loader_throughput(shards, batch=args.loader_batch, images=args.num, workers=(0, args.workers)),
            "bytes_per_image": round(size / max(len(shards), 1)),
            "imagenet_train_gb_extrapolated": round(size / max(len(shards), 1) * IMAGENET_TRAIN_IMAGES / 1e9, 1),
        })
    return result


def loader_throughput(shards, *, batch: int, images: int, workers: Sequence[int]) -> dict:
    """Images/s of the training loader (``step_loader``: the tokenizer's and proxy's, with pinned
    memory on CUDA) at each worker count, over about ``images`` images in batches of ``batch``: what
    the loader can feed, to set beside a model's training images/s."""
    from spectralar.data.loader import step_loader

    batch = min(batch, len(shards))
    steps = max(1, images // batch)
    result = {}
    for count in dict.fromkeys(workers):
        loader = step_loader(shards, batch_size=batch, seed=0, start_step=0, total_steps=steps + 1, workers=count)
        batches = iter(loader)
        next(batches)  # workers started, first batch in: not timed
        start = time.perf_counter()
        seen = sum(len(images_b) for images_b, _, _ in batches)
        result[f"loader_images_per_second_workers{count}"] = round(seen / (time.perf_counter() - start), 1)
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
    from spectralar.training import autocast, build_adamw, mfu, peak_flops, resolve_device, training_precision

    cfg = TokenizerConfig.titok_b64() if args.config == "b64" else _model_configs(args.params)[0]
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(cfg).to(device)
    optimizer = build_adamw(model, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    codes = torch.randint(0, cfg.proxy_codebook_size, (args.batch, cfg.grid_size, cfg.grid_size), device=device)
    prefix = torch.randint(1, cfg.num_tokens + 1, (args.batch,), device=device)

    cpu_bf16 = getattr(args, "cpu_bf16", False)

    def step() -> None:
        with autocast(device, True, cpu_bf16):
            output, _, vq = model(x, prefix)
        if cfg.decoder_head == "pixels":  # stage 1 regresses the pixels of I'_i (the target's cost is negligible)
            loss = torch.nn.functional.mse_loss(output.float(), x) + vq
        else:
            loss = torch.nn.functional.cross_entropy(output.float(), codes) + vq
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
    flops = (_vit_flops_per_sample(model.encoder.blocks, cfg.encoder_depth, cfg.width,
                                   cfg.encoder_num_patches + cfg.num_tokens)
             + _vit_flops_per_sample(model.decoder.blocks, cfg.decoder_depth, cfg.width,
                                     cfg.num_patches + cfg.num_tokens))
    utilisation = mfu(flops, rate, peak_flops(device))
    return {
        "config": args.config, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": args.batch,
        "precision": training_precision(device, True, cpu_bf16),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_second": round(rate, 1),
        "model_tflops_per_image": round(flops / 1e12, 4),
        "achieved_tflops": round(flops * rate / 1e12, 3),
        "mfu": None if utilisation is None else round(utilisation, 4),
    }


GENERATOR_CONFIGS = ("default", "d16", "d20", "d24", "d16_p4")



def generator_training(config, device: str | torch.device = "cpu", batch: int = 64, steps: int = 10,
              warmup: int = 2, bf16: bool = True, peak: Optional[float] = None, cpu_bf16: bool = False) -> dict:
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
        with autocast(device, bf16, cpu_bf16):
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



def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls: on a shared machine the minimum is the least disturbed."""
    from spectralar.training import synchronize

    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - begin)
    return best


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def generator_sampling(config, device: str | torch.device = "cpu", batch: int = 64, repeats: int = 2,
                       cfg_scale: float = 1.5, recompute_repeats: int = 1, compiled: bool = False) -> dict:
    """Sampling images/s of a randomly initialised generator (speed does not depend on the weights):

    kv_cache   ``generate`` as the sample stage runs it (KV cache, CFG on one doubled batch);
    no_cache   ``generate`` recomputing the whole prefix at every step (the reference path; skipped
               with ``recompute_repeats`` 0);
    floor      one teacher-forced forward of the whole sequence over the same rows (2 x batch with
               CFG): the same matmuls in one pass, what step-by-step sampling can at best approach;
    compiled   (with ``compiled``) ``generate(compiled=True)``: the static KV cache through
               ``torch.compile`` (CUDA graphs on a GPU; ``sample.compile``), its tracing in the
               warm-up and reported as ``compile_seconds``.

    The cached sampler, the floor (and the compiled sampler) are warmed up and then timed alternately
    (best of ``repeats``), so all see the same load; full recompute, N/k times slower, is timed
    ``recompute_repeats`` times.
    """
    from spectralar.models.generator import SpectralGPT
    from spectralar.models.sampling import cyclic_labels, generate

    device = torch.device(device)
    torch.manual_seed(0)
    model = SpectralGPT(config).to(device).eval()
    labels_B = cyclic_labels(config.num_classes, -(-batch // config.num_classes))[:batch].to(device)
    rows_R = torch.cat((labels_B, torch.full_like(labels_B, model.null_class))) if cfg_scale else labels_B
    ids_RT = torch.randint(0, config.vocab_size, (rows_R.shape[0], config.num_tokens - config.tokens_per_step),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def sample(cached: bool, compile_step: bool = False) -> Callable[[], object]:
        generator = torch.Generator(device).manual_seed(0)
        return lambda: generate(model, labels_B, cfg_scale=cfg_scale, generator=generator, use_kv_cache=cached,
                                compiled=compile_step)

    @torch.no_grad()
    def floor() -> None:
        model.logits_from_prefix(model.class_condition(rows_R), ids_RT)

    timed = {"kv_cache": sample(True), "floor": floor}
    if compiled:
        timed["compiled"] = sample(True, compile_step=True)
    seconds = dict.fromkeys(timed, math.inf)
    warmup = {}
    for name, run in timed.items():
        warmup[name] = _best_seconds(run, device, 1)
    for _ in range(repeats):
        for name, run in timed.items():
            seconds[name] = min(seconds[name], _best_seconds(run, device, 1))
    if recompute_repeats:
        seconds["no_cache"] = _best_seconds(sample(False), device, recompute_repeats)
    rate = {name: batch / value for name, value in seconds.items()}
    result = {"device": str(device), "batch": batch, "num_tokens": config.num_tokens,
              "width": config.resolved_width, "depth": config.depth,
              "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
              "images_per_second_kv_cache": _significant(rate["kv_cache"]),
              "images_per_second_floor": _significant(rate["floor"]),
              "kv_cache_over_floor": round(rate["kv_cache"] / rate["floor"], 3)}
    if recompute_repeats:
        result |= {"images_per_second_no_cache": _significant(rate["no_cache"]),
                   "kv_cache_speedup": round(rate["kv_cache"] / rate["no_cache"], 2)}
    if compiled:
        result |= {"images_per_second_compiled": _significant(rate["compiled"]),
                   "compiled_over_floor": round(rate["compiled"] / rate["floor"], 3),
                   "compiled_over_kv_cache": round(rate["compiled"] / rate["kv_cache"], 3),
                   "compile_seconds": round(warmup["compiled"] - seconds["compiled"], 1)}
    return result


# Sampling sizes: the chosen config, and a wider, deeper variant at the paper's 64 tokens (nearer the
# ImageNet configs, at a size a CPU samples in seconds); each with its default images per sampling call.
SAMPLING_SIZES: dict[str, tuple[dict, int]] = {
    "config": ({}, 100),
    "w512-d8-n64": ({"width": 512, "depth": 8, "num_tokens": 64}, 50),
}
SAMPLING_COLUMNS = ("size", "threads", "batch", "parameters", "images_per_second_kv_cache",
                    "images_per_second_no_cache", "images_per_second_floor", "kv_cache_over_floor")
COMPILED_COLUMNS = ("images_per_second_compiled", "compiled_over_floor", "compile_seconds")


def _generator_config(args: argparse.Namespace):
    from spectralar.models.generator import GeneratorConfig

    cfg = _model_configs(args.params)[1] if args.config == "default" else getattr(GeneratorConfig, args.config)()
    return dataclasses.replace(cfg, num_tokens=args.num_tokens) if args.num_tokens else cfg


def bench_generator(args: argparse.Namespace) -> dict:
    """Training throughput of one generator config, then sampling at every size and thread count;
    all from randomly initialised weights (speed does not depend on the weights)."""
    from spectralar.stages.report import markdown_table
    from spectralar.training import resolve_device, training_precision

    cfg = _generator_config(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    threads = args.threads or ([1, 2] if device.type == "cpu" else [torch.get_num_threads()])
    result: dict = {"config": args.config, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "num_tokens": cfg.num_tokens, "tokens_per_step": cfg.tokens_per_step}
    if args.steps:
        cpu_bf16 = getattr(args, "cpu_bf16", False)
        torch.set_num_threads(max(threads))
        train = generator_training(cfg, device, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                   bf16=not args.fp32, peak=args.peak_flops, cpu_bf16=cpu_bf16)
        result["train"] = {k: train[k] for k in ("batch", "steps", "parameters", "images_per_second",
                                                 "tokens_per_second", "flops_per_image", "mfu")}
        result["train"]["threads"] = max(threads)
        result["train"]["precision"] = training_precision(device, not args.fp32, cpu_bf16)
    result["sample"] = []
    for size in args.sample_sizes:
        overrides, default_batch = SAMPLING_SIZES[size]
        size_cfg = dataclasses.replace(cfg, **overrides)
        for count in threads:
            torch.set_num_threads(count)
            row = generator_sampling(size_cfg, device, batch=args.sample_batch or default_batch,
                                     repeats=args.sample_repeats, compiled=args.sample_compiled)
            result["sample"].append({"size": size, **row})
    if result["sample"]:
        print(markdown_table(result["sample"], SAMPLING_COLUMNS + (COMPILED_COLUMNS if args.sample_compiled else ())))
    return result


def bench_tokenizer_quality(args: argparse.Namespace) -> dict:
    """The evaluate stage's reconstruction metrics for one tokenizer file, printed as a table."""
    from spectralar.artifacts import load_codec
    from spectralar.data.shards import ImageShards
    from spectralar.evaluation.quality import equal_bits_pca
    from spectralar.evaluation.quality_table import quality_rows, quality_summary
    from spectralar.stages.common import stage_device
    from spectralar.stages.evaluate import EvaluateConfig, Scorer, reconstruction_metrics
    from spectralar.stages.report import markdown_table

    device = stage_device(args.device)
    codec = load_codec(args.tokenizer, device)
    val, train = ImageShards(args.data, "val"), ImageShards(args.data, "train")
    cfg = EvaluateConfig(feature_extractor="domain", reconstruction_images=args.reconstruction_images,
                         psnr_images=args.images, baseline_images=args.baseline_images)
    n = codec.num_tokens
    pca = (equal_bits_pca(train, n, codec.tokenizer.config.codebook_size, cfg.baseline_images)
           if cfg.baseline_images else None)
    metrics = reconstruction_metrics(Scorer(cfg, args.evalnet, device), codec, val, cfg.reconstruction_images,
                                     cfg.psnr_images, pca)
    metrics["quality_summary"] = quality_summary(metrics, compare_up_to=3 * n // 4)
    print(markdown_table(quality_rows(metrics, codec.tokenizer.config.codebook_size)))
    keys = ("quality_summary", "codebook_usage", "codebook_perplexity", "rfid", "reconstruction_class_accuracy",
            "val_class_accuracy", "pca_equal_bits_code", "psnr_images", "reconstruction_images")
    return {key: metrics[key] for key in keys if key in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m spectralar.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    read = sub.add_parser("read", help="prepare + shard read throughput")
    read.add_argument("--data", help="an existing prepared dataset (default: a synthetic one)")
    read.add_argument("--split", default="train")
    read.add_argument("--num", type=int, default=1000)
    read.add_argument("--resolution", type=int, default=256)
    read.add_argument("--workers", type=int, default=2, help="prepare's decode workers, and the training loader's")
    read.add_argument("--loader-batch", type=int, default=64, help="the training loader's batch")
    tok = sub.add_parser("tokenizer", help="tokenizer training throughput and MFU")
    tok.add_argument("--config", choices=("default", "b64"), default="default")
    tok.add_argument("--params", default="params.yaml", help="params file for --config default")
    tok.add_argument("--device", default="auto")
    tok.add_argument("--batch", type=int, default=64)
    tok.add_argument("--steps", type=int, default=10)
    tok.add_argument("--warmup", type=int, default=3)
    tok.add_argument("--cpu-bf16", action="store_true",
                     help="bf16 autocast on the CPU too (train_tokenizer.cpu_bf16: true); CUDA always autocasts")
    gen = sub.add_parser("generator",
                         help="generator training tokens/s + MFU; sampling images/s: KV cache, recompute, floor")
    gen.add_argument("--config", choices=GENERATOR_CONFIGS, default="default")
    gen.add_argument("--params", default="params.yaml", help="params file for --config default")
    gen.add_argument("--num-tokens", type=int, default=0,
                     help="sequence length N instead of the config's (e.g. 64, the paper's, for the default model)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--batch", type=int, default=128, help="training batch per step")
    gen.add_argument("--warmup", type=int, default=3)
    gen.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    gen.add_argument("--cpu-bf16", action="store_true",
                     help="training in bf16 autocast on the CPU too (train_generator.cpu_bf16)")
    gen.add_argument("--peak-flops", type=float, default=None,
                     help="peak FLOP/s of the device for MFU (CUDA: looked up by name when omitted)")
    gen.add_argument("--steps", type=int, default=10, help="training steps (0 = skip training)")
    gen.add_argument("--sample-sizes", nargs="*", choices=tuple(SAMPLING_SIZES), default=list(SAMPLING_SIZES),
                     help="sampling sizes: the config, and a width-512, depth-8, 64-token variant (none = skip)")
    gen.add_argument("--sample-batch", type=int, default=0,
                     help="images per sampling call (0 = each size's default: 100 and 50)")
    gen.add_argument("--sample-repeats", type=int, default=3, help="timed calls of the cached sampler and the floor")
    gen.add_argument("--sample-compiled", action="store_true",
                     help="also time generate(compiled=True): the static KV cache through torch.compile "
                          "(CUDA graphs on a GPU); its tracing is reported apart")
    gen.add_argument("--threads", type=int, nargs="+", default=None,
                     help="CPU thread counts to sample at (default: 1 2 on the CPU)")
    quality = sub.add_parser("tokenizer-quality", help="per-prefix PSNR beside DCT/PCA/proxy ceilings, usage, rFID")
    quality.add_argument("--tokenizer", default="models/tokenizer/tokenizer.pt")
    quality.add_argument("--data", default="data/prepared")
    quality.add_argument("--evalnet", default="models/evalnet/evalnet.pt", help="train_evalnet's domain classifier")
    quality.add_argument("--images", type=int, default=500, help="val images for the per-prefix table")
    quality.add_argument("--reconstruction-images", type=int, default=1000, help="val images for rFID / accuracy")
    quality.add_argument("--baseline-images", type=int, default=10000, help="train images the PCA is fitted on")
    quality.add_argument("--device", default="auto")
    args = parser.parse_args()
    runners = {"read": bench_read, "tokenizer": bench_tokenizer, "generator": bench_generator,
               "tokenizer-quality": bench_tokenizer_quality}
    print(json.dumps(runners[args.what](args), indent=2))


if __name__ == "__main__":
    main()
