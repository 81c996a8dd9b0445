"""train_proxy: the proxy VQ model whose codes supervise tokenizer stage 1 (TiTok's "proxy codes").

With ``train_proxy.checkpoint`` naming MaskGIT-VQGAN's ``maskgit-vqgan-imagenet-f16-256.bin`` the
official weights are loaded (strict key match) instead of training; otherwise (the embedded
default) a small conv VQ model is trained on the prepared images with reconstruction + VQ losses.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from spectralar.artifacts import PROXY_FILE, proxy_config_for, save_proxy
from spectralar.config import require
from spectralar.data.loader import step_loader, to_float
from spectralar.data.shards import ImageShards
from spectralar.io import atomic_path
from spectralar.model_card import MODEL_CARD, write_model_card
from spectralar.evaluation.measures import codebook_statistics, per_image_mse, psnr_from_mse
from spectralar.models.proxy_vq import ProxyVQModel, load_maskgit_checkpoint
from spectralar.stages.common import Checkpointer, stage_device
from spectralar.log import progress
from spectralar.training import EMA, DeadCodeRestarts, Throughput, build_adamw, check_finite, lr_at, set_lr



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
        require(self, "steps", "batch_size", "checkpoint_every", "log_every", "eval_images", at_least=1)
        require(self, "lr", "grad_clip", above=0)
        require(self, "weight_decay", at_least=0)
        require(self, "ema_decay", at_least=0, below=1)
        require(self, "dead_code_restart_every", at_least=0, meaning="0 = off")
        require(self, "warmup_steps", at_least=0, at_most=self.steps, meaning="at most steps")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--out", default="models/proxy", help="output directory (proxy.pt)")
    parser.add_argument("--checkpoints", default="runs/checkpoints/train_proxy", help="resumable checkpoints")


def run(ctx) -> dict:
    cfg: TrainProxyConfig = ctx.params.train_proxy
    device = stage_device(ctx.params.run.device)
    out = Path(ctx.args.out)
    val = ImageShards(ctx.args.data, "val")
    model_cfg = proxy_config_for(ctx.params.proxy, val.image_shape)  # image size and channels: the data's
    model = ProxyVQModel(model_cfg)
    if cfg.checkpoint:
        load_maskgit_checkpoint(model, cfg.checkpoint)
        ctx.log.info("loaded official proxy weights from %s", cfg.checkpoint)
        model.to(device)
        trained = {"trained_steps": 0, "source": "checkpoint"}
    else:
        checkpointer = Checkpointer(ctx.args.checkpoints, ctx.params.digest(ctx.sections + ("data",)))
        trained = train(model, cfg, ImageShards(ctx.args.data, "train"), device, seed=ctx.params.run.seed,
                        checkpointer=checkpointer, log=ctx.log, log_metrics=ctx.tracker.log_metrics)
    metrics = {**trained, **evaluate(model, val, cfg.eval_images, device)}
    with atomic_path(out, directory=True) as tmp:  # the whole folder or nothing
        save_proxy(tmp / PROXY_FILE, model)
        ctx.write_config(tmp, image_size=model_cfg.image_size, in_channels=model_cfg.in_channels,
                         grid_size=model_cfg.grid_size, downsample_factor=model_cfg.downsample_factor)
        write_model_card(tmp, PROXY_FILE, metrics, data=ctx.args.data)
    ctx.log_outputs(out, ("config.json", MODEL_CARD), checkpoints=(PROXY_FILE,))
    Checkpointer(ctx.args.checkpoints, "").clear()  # only now that every output is written
    ctx.log.info("proxy: PSNR %.2f dB, codebook usage %.1f%%", metrics["psnr"], 100 * metrics["codebook_usage"])
    return metrics


def train(model: ProxyVQModel, cfg: TrainProxyConfig, train_shards: ImageShards, device: torch.device, *,
          seed: int, checkpointer: Optional[Checkpointer] = None, log: logging.Logger = logging.getLogger(__name__),
          log_metrics: Callable[..., None] = lambda metrics, step=None: None) -> dict:
    """Train ``model`` in place (reconstruction + VQ loss; EMA weights at the end).

    Args:
        model: the proxy, any device (moved to ``device``).
        cfg: optimiser and schedule settings.
        train_shards: the prepared training split.
        seed: data order and dead-code restarts.
        checkpointer: resumable checkpoints (None: no checkpoints, start from scratch).
        log, log_metrics: a logger, and a sink for ``{name: value}, step=`` training curves.
    Returns: steps trained, restarted codes and wall time.
    """
    model.to(device).train()
    optimizer = build_adamw(model, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay, warmup=True)
    restarts = DeadCodeRestarts(model.config.codebook_size, cfg.dead_code_restart_every, seed=seed, device=device)
    objects = {"model": model, "optimizer": optimizer, "ema": ema, "restarts": restarts}
    start = checkpointer.resume(objects) if checkpointer is not None else 0
    loader = step_loader(train_shards, batch_size=cfg.batch_size, seed=seed, start_step=start,
                         total_steps=cfg.steps, in_memory=train_shards.format == "raw")
    meter = Throughput()
    begin = time.perf_counter()
    bar = progress(loader, total=cfg.steps, initial=start, desc="train_proxy", log_every=cfg.log_every,
                   unit="step", logger=log)
    for step, (images, _, _) in enumerate(bar, start=start):
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
            bar.set_postfix(recon=recon_loss.item(), vq=vq_loss.item(), lr=optimizer.param_groups[0]["lr"],
                            img_per_s=round(meter.rate))
            log_metrics({"train_recon": recon_loss.item(), "train_vq": vq_loss.item()}, step=step + 1)
        if checkpointer is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
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
        errors.append(per_image_mse(reconstruction, x))  # (B,) on the [0, 1] scale
        ids_all.append(ids.flatten())
    psnr = psnr_from_mse(torch.cat(errors)).mean().item()  # mean of per-image PSNRs
    codebook = codebook_statistics(torch.cat(ids_all), model.config.codebook_size, exp_on_host=False)
    return {"psnr": round(psnr, 3), "codebook_usage": round(codebook["codebook_usage"], 4),
            "codebook_perplexity": round(codebook["codebook_perplexity"], 2), "eval_images": count}
