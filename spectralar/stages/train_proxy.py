"""train_proxy: the proxy VQ model whose codes supervise tokenizer stage 1 (TiTok's "proxy codes").

With ``train_proxy.checkpoint`` naming MaskGIT-VQGAN's ``maskgit-vqgan-imagenet-f16-256.bin`` the
official weights are loaded (strict key match) instead of training; otherwise (the embedded
default) a small conv VQ model is trained on the prepared images with reconstruction + VQ losses.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from spectralar.data.loader import step_loader, to_float
from spectralar.data.shards import ImageShards
from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel, codebook_usage, load_maskgit_checkpoint
from spectralar.stages.common import Checkpointer, save_model_file, stage_device
from spectralar.training import EMA, DeadCodeRestarts, Throughput, build_adamw, check_finite, lr_at, set_lr

SECTIONS = ("run", "proxy", "train_proxy")


@dataclass(frozen=True)
class TrainProxyConfig:
    checkpoint: str = ""  # official MaskGIT-VQGAN weights; "" = train on the prepared data
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    # Codes unused for this many steps are re-seeded with encoder outputs of the current batch
    # (dead-code restart, as in Jukebox/SoundStream); 0 = off. Not applied to loaded checkpoints.
    dead_code_restart_every: int = 100
    checkpoint_every: int = 500
    log_every: int = 100
    eval_images: int = 1000

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("steps, batch_size, checkpoint_every and log_every must be positive")
        if self.dead_code_restart_every < 0:
            raise ValueError("dead_code_restart_every must be >= 0 (0 = off)")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--out", default="models/proxy", help="output directory (proxy.pt)")
    parser.add_argument("--checkpoints", default="runs/checkpoints/train_proxy", help="resumable checkpoints")


def run(ctx) -> dict:
    cfg: TrainProxyConfig = ctx.params.train_proxy
    model_cfg: ProxyConfig = ctx.params.proxy
    device = stage_device(ctx.params.run.device)
    out = Path(ctx.args.out)
    model = ProxyVQModel(model_cfg)
    val = ImageShards(ctx.args.data, "val")
    _check_data(val, model_cfg)
    if cfg.checkpoint:
        load_maskgit_checkpoint(model, cfg.checkpoint)
        ctx.log.info("loaded official proxy weights from %s", cfg.checkpoint)
        model.to(device)
        trained = {"trained_steps": 0, "source": "checkpoint"}
    else:
        trained = train(ctx, model, cfg, device)
    metrics = {**trained, **evaluate(model, val, cfg.eval_images, device)}
    save_model_file(out / "proxy.pt", "proxy", {"proxy": model_cfg}, {"proxy": model.state_dict()})
    ctx.write_config(out, grid_size=model_cfg.grid_size, downsample_factor=model_cfg.downsample_factor)
    ctx.log_outputs(out, ("config.json",), checkpoints=("proxy.pt",))
    Checkpointer(ctx.args.checkpoints, "").clear()  # only now that every output is written
    ctx.log.info("proxy: PSNR %.2f dB, codebook usage %.1f%%", metrics["psnr"], 100 * metrics["codebook_usage"])
    return metrics


def _check_data(shards: ImageShards, cfg: ProxyConfig) -> None:
    height, width, channels = shards.image_shape
    if (height, channels) != (cfg.image_size, cfg.in_channels):
        raise ValueError(f"proxy.image_size/in_channels = {cfg.image_size}/{cfg.in_channels} but the prepared "
                         f"images are {height}x{width}x{channels} (data.resolution / data.source)")


def train(ctx, model: ProxyVQModel, cfg: TrainProxyConfig, device: torch.device) -> dict:
    train_shards = ImageShards(ctx.args.data, "train")
    model.to(device).train()
    optimizer = build_adamw(model, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay, warmup=True)
    restarts = DeadCodeRestarts(model.config.codebook_size, cfg.dead_code_restart_every,
                                seed=ctx.params.run.seed, device=device)
    objects = {"model": model, "optimizer": optimizer, "ema": ema, "restarts": restarts}
    checkpointer = Checkpointer(ctx.args.checkpoints, ctx.params.digest(SECTIONS + ("data",)))
    start = checkpointer.resume(objects)
    loader = step_loader(train_shards, batch_size=cfg.batch_size, seed=ctx.params.run.seed, start_step=start,
                         total_steps=cfg.steps, in_memory=train_shards.format == "raw")
    meter = Throughput()
    begin = time.perf_counter()
    for step, (images, _, _) in enumerate(loader, start=start):
        set_lr(optimizer, lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                schedule="cosine", final_lr=cfg.lr * 0.1))
        x = to_float(images.to(device, non_blocking=True))  # (B, C, H, W)
        reconstruction, ids, vq_loss = model(x)
        restarts.observe(ids)
        recon_loss = F.mse_loss(reconstruction, x)
        loss = recon_loss + vq_loss
        check_finite(loss, step, {"recon": recon_loss, "vq": vq_loss})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(model)
        meter.update(len(images))
        if restarts.due(step):
            with torch.no_grad():
                latents_BDhw = model.encoder(model._to_native(x))
            restarts.restart(step, model.quantize.embedding.weight,
                             latents_BDhw.permute(0, 2, 3, 1).reshape(-1, model.config.code_dim),
                             optimizer=optimizer, ema_shadow=ema.shadow["quantize.embedding.weight"])
        if (step + 1) % cfg.log_every == 0:
            ctx.log.info("step %d/%d recon %.4f vq %.4f lr %.2e %.0f img/s", step + 1, cfg.steps,
                         recon_loss.item(), vq_loss.item(), optimizer.param_groups[0]["lr"], meter.rate)
            ctx.tracker.log_metrics({"train/recon": recon_loss.item(), "train/vq": vq_loss.item()}, step=step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpointer.save(step + 1, objects)
    ema.copy_to(model)
    return {"trained_steps": cfg.steps, "source": "trained", "restarted_codes": restarts.restarted,
            "train_seconds": round(time.perf_counter() - begin, 1)}


@torch.no_grad()
def evaluate(model: ProxyVQModel, shards: ImageShards, count: int, device: torch.device) -> dict:
    model.eval()
    count = min(count, len(shards))
    errors, ids_all = [], []
    for start in range(0, count, 250):
        images = torch.from_numpy(shards.images(range(start, min(start + 250, count)))).permute(0, 3, 1, 2)
        x = to_float(images.to(device))
        ids = model.encode_ids(x)
        reconstruction = model.codes_to_images(ids).clamp(-1, 1)
        errors.append(((reconstruction - x) / 2).pow(2).flatten(1).mean(1))  # MSE on the [0, 1] scale
        ids_all.append(ids.flatten())
    mse = torch.cat(errors)
    psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()
    usage = codebook_usage(torch.cat(ids_all), model.config.codebook_size)
    return {"psnr": round(psnr, 3), "codebook_usage": round(usage["fraction_used"], 4),
            "codebook_perplexity": round(usage["perplexity"], 2), "eval_images": count}
