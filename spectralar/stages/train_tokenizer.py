"""train_tokenizer: Nested Spectral Tokenization (paper §3.2, Algorithm 1), TiTok's two stages.

Stage 1 (steps [0, stage1_steps)): per sample draw i ~ U{1..N}, decode from the prefix s_1..s_i,
cross-entropy against the proxy codes of I'_i = IDCT(DCT(I) ∘ 1_{ω_i}), plus the VQ loss; with
``dead_code_restart_every`` > 0, codes unused for that many steps are re-seeded with encoder outputs.
Stage 2 (the next stage2_steps): encoder and quantizer frozen (token ids unchanged); the
tokenizer's decoder and the proxy decoder are fine-tuned to the pixels of I'_i with
L2 + perceptual + adversarial (hinge + LeCam) terms.
Table 4 switches live in the ``tokenizer`` section: ``spectral_supervision`` (off: every sample
uses all N tokens and the full image, plain TiTok), ``causal_mask``, ``nonuniform_mapping``.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spectralar.data.loader import step_loader, to_float
from spectralar.data.shards import ImageShards
from spectralar.io import atomic_path
from spectralar.models.codec import SpectralCodec
from spectralar.models.losses import PatchDiscriminator, hinge_d_loss, lecam_regularizer, build_perceptual
from spectralar.evaluation.reconstruction import prefix_psnr
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
from spectralar.spectral import band_limit
from spectralar.artifacts import CONFIG, HISTORY, TOKENIZER_FILE, load_proxy, load_proxy_codes, proxy_code_levels, save_tokenizer, \
    tokenizer_config_for, write_history
from spectralar.config import ConfigError
from spectralar.stages.common import Checkpointer, stage_device
from spectralar.training import (EMA, DeadCodeRestarts, HistoryRows, Throughput, autocast, build_adamw, check_finite,
                                 lr_at, set_lr, step_generator)



@dataclass(frozen=True)
class TrainTokenizerConfig:
    batch_size: int = 64
    stage1_steps: int = 1000
    stage2_steps: int = 200
    lr: float = 1e-3  # TiTok: 1e-4 at batch 256
    stage2_lr: float = 2e-4
    final_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)  # TiTok stage 1
    stage2_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    stage2_warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Stage 1 only: codes unused for this many steps are re-seeded with encoder outputs of the
    # current batch (dead-code restarts, Jukebox/SoundStream; not in TiTok's recipe); 0 = off.
    dead_code_restart_every: int = 0
    augment_hflip: bool = False  # needs extract_proxy_codes.mode: online (codes are of unflipped images)
    l2_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_network: Literal["none", "vgg16"] = "none"
    perceptual_weights: str = ""  # vgg16: torchvision's vgg16-397923af.pth
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 0  # counted from the start of stage 2
    lecam_weight: float = 0.001
    discriminator_lr: float = 1e-4
    bf16: bool = True  # autocast on CUDA
    checkpoint_every: int = 250
    log_every: int = 50
    eval_images: int = 500

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ValueError("batch_size must be positive and stage steps non-negative")
        if self.stage1_steps + self.stage2_steps == 0:
            raise ValueError("stage1_steps + stage2_steps must be positive")
        if self.perceptual_weight > 0 and self.perceptual_network == "none":
            raise ValueError("perceptual_weight > 0 needs perceptual_network (vgg16) and its weights")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be positive")
        if self.dead_code_restart_every < 0:
            raise ValueError("dead_code_restart_every must be >= 0 (0 = off)")
        if self.warmup_steps > self.stage1_steps or self.stage2_warmup_steps > self.stage2_steps:
            raise ValueError("warmup_steps / stage2_warmup_steps must not exceed stage1_steps / stage2_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--proxy", default="models/proxy/proxy.pt", help="proxy model file")
    parser.add_argument("--codes", default="data/proxy_codes", help="extract_proxy_codes output")
    parser.add_argument("--out", default="models/tokenizer", help="output directory (tokenizer.pt, figures)")
    parser.add_argument("--checkpoints", default="runs/checkpoints/train_tokenizer", help="resumable checkpoints")


# ------------------------------------------------------------------------------------------------
# Algorithm 1 pieces
# ------------------------------------------------------------------------------------------------

def sample_levels(batch: int, tokenizer_cfg: TokenizerConfig, generator: torch.Generator) -> torch.Tensor:
    """0-based level per sample: i-1 with i ~ U{1..N} (Alg. 1 line 4); N-1 without spectral supervision."""
    if not tokenizer_cfg.spectral_supervision:
        return torch.full((batch,), tokenizer_cfg.num_tokens - 1, dtype=torch.long)
    return torch.randint(0, tokenizer_cfg.num_tokens, (batch,), generator=generator)


class ProxyTargets:
    """Stage-1 targets: proxy codes of I'_i, from the precomputed table or computed online."""

    def __init__(self, codes_dir: str | Path, proxy, omegas: tuple[int, ...], tokenizer_cfg: TokenizerConfig):
        self.manifest, self.table = load_proxy_codes(codes_dir)
        self.proxy, self.omegas, self.cfg = proxy, omegas, tokenizer_cfg
        expected = list(proxy_code_levels(tokenizer_cfg))
        if self.manifest["omegas"] != expected:
            raise ValueError(f"proxy codes were extracted for omegas {self.manifest['omegas']}, the tokenizer "
                             f"needs {expected}: rerun extract_proxy_codes")

    @property
    def online(self) -> bool:
        return self.table is None

    def __call__(self, x: torch.Tensor, index: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        grid = self.proxy.config.grid_size
        if self.online:
            omega = torch.tensor(self.omegas, device=x.device)[levels.to(x.device)]
            return self.proxy.encode_ids(band_limit(x, omega))  # (B, h, w)
        column = levels if self.cfg.spectral_supervision else torch.zeros_like(levels)
        rows = self.table[index.numpy(), column.numpy()]  # (B, h*w) uint16
        return torch.from_numpy(rows.astype(np.int64)).reshape(-1, grid, grid).to(x.device)


def pixel_targets(x: torch.Tensor, levels: torch.Tensor, omegas: tuple[int, ...]) -> torch.Tensor:
    omega = torch.tensor(omegas, device=x.device)[levels.to(x.device)]
    return band_limit(x, omega)  # (B, C, H, W)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

class Trainer:
    """Algorithm 1 with TiTok's two stages, over explicit values (no params file, no stage context).

    Args:
        tok_cfg: the complete tokenizer config (image size, channels and proxy codebook filled in).
        cfg: optimiser, schedule and loss settings.
        train: the prepared training split.
        proxy: the trained proxy (its decoder is fine-tuned in stage 2).
        codes_dir: extract_proxy_codes' output (the stage-1 targets, or online mode).
        device, seed: where, and the seed of data order, levels and restarts.
        checkpointer: resumable checkpoints (None: none).
        log, log_metrics: a logger, and a sink for ``{name: value}, step=`` training curves.
    ``fit()`` trains; ``history`` holds the logged rows.
    """

    def __init__(self, tok_cfg: TokenizerConfig, cfg: TrainTokenizerConfig, train: ImageShards, proxy,
                 codes_dir: str | Path, device: torch.device, *, seed: int,
                 checkpointer: Optional[Checkpointer] = None, log: logging.Logger = logging.getLogger(__name__),
                 log_metrics: Callable[..., None] = lambda metrics, step=None: None) -> None:
        self.cfg, self.tok_cfg, self.seed, self.device = cfg, tok_cfg, seed, device
        self.log, self.log_metrics = log, log_metrics
        self.omegas = tok_cfg.omegas
        self.train = train
        self.proxy = proxy
        if tok_cfg.grid_size != proxy.config.grid_size:
            raise ConfigError(f"tokenizer.patch_size: {tok_cfg.patch_size} gives a {tok_cfg.grid_size}x{tok_cfg.grid_size} "
                              f"patch grid but the proxy's code grid is {proxy.config.grid_size}x{proxy.config.grid_size} "
                              f"(patch_size must equal the proxy's downsample factor)")
        self.tokenizer = NestedSpectralTokenizer(self.tok_cfg).to(self.device)
        self.model = nn.ModuleDict({"tokenizer": self.tokenizer, "proxy": self.proxy})
        self.targets = ProxyTargets(codes_dir, self.proxy, self.omegas, self.tok_cfg)
        if self.cfg.augment_hflip and not self.targets.online:
            raise ValueError("train_tokenizer.augment_hflip needs extract_proxy_codes.mode: online "
                             "(precomputed codes are of unflipped images)")
        self.total = self.cfg.stage1_steps + self.cfg.stage2_steps
        self.checkpointer = checkpointer
        self.restarts = DeadCodeRestarts(self.tok_cfg.codebook_size, self.cfg.dead_code_restart_every,
                                         seed=self.seed, device=self.device)
        self.history = HistoryRows()  # checkpointed: a resumed run writes the whole curve

    # -- phase set-up -------------------------------------------------------------------------
    def _phase_objects(self, phase: int) -> dict:
        cfg = self.cfg
        if phase == 1:
            for p in self.proxy.parameters():
                p.requires_grad_(False)
            optimizer = build_adamw(self.tokenizer, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
            objects = {"model": self.model, "optimizer": optimizer}
        else:
            trainable = (self.tokenizer.decoder, self.proxy.decoder)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for module in trainable:
                for p in module.parameters():
                    p.requires_grad_(True)
            optimizer = build_adamw(nn.ModuleList(trainable), lr=cfg.stage2_lr, betas=cfg.stage2_betas,
                                    weight_decay=cfg.weight_decay)
            objects = {"model": self.model, "optimizer": optimizer}
            if cfg.adversarial_weight > 0:
                self.discriminator = PatchDiscriminator(self.tok_cfg.in_channels).to(self.device)
                self.lecam = torch.zeros(2, device=self.device)  # EMA of D(real), D(fake)
                objects["discriminator"] = self.discriminator
                objects["disc_optimizer"] = torch.optim.Adam(self.discriminator.parameters(),
                                                             lr=cfg.discriminator_lr, betas=(0.5, 0.999))
            self.perceptual = build_perceptual(cfg.perceptual_network, cfg.perceptual_weights,
                                               "train_tokenizer.perceptual_weights")
            if self.perceptual is not None:
                self.perceptual.to(self.device)
        objects["ema"] = EMA(self.model, cfg.ema_decay, warmup=True)
        objects["history"] = self.history
        if self.restarts.enabled:
            objects["restarts"] = self.restarts  # code counts since the last restart, checkpointed
        return objects

    def fit(self) -> dict:
        start = self.checkpointer.peek_step() if self.checkpointer is not None else 0
        # a checkpoint at step s holds the objects of step s-1's phase
        phase = 1 if start <= self.cfg.stage1_steps else 2
        objects = self._phase_objects(phase)
        start = self.checkpointer.resume(objects) if self.checkpointer is not None else 0
        meter, begin = Throughput(), time.perf_counter()
        loader = step_loader(self.train, batch_size=self.cfg.batch_size, seed=self.seed, start_step=start,
                             total_steps=self.total, in_memory=self.train.format == "raw")
        for step, (images, _, index) in enumerate(loader, start=start):
            if phase == 1 and step >= self.cfg.stage1_steps:
                objects["ema"].copy_to(self.model)  # stage 2 starts from the EMA of stage 1 (TiTok)
                phase, objects = 2, self._phase_objects(2)
            x = to_float(images.to(self.device, non_blocking=True))
            generator = step_generator(self.seed, step)
            if self.cfg.augment_hflip:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
            levels = sample_levels(len(x), self.tok_cfg, generator)
            terms = self._stage1(x, index, levels, objects, step) if phase == 1 else \
                self._stage2(x, levels, objects, step - self.cfg.stage1_steps)
            objects["ema"].update(self.model)
            # no restart at the last stage-1 step: stage 2 freezes the codes, none could be trained
            if phase == 1 and self.restarts.due(step) and step + 1 < self.cfg.stage1_steps:
                self._restart_dead_codes(x, step, objects)
            meter.update(len(x))
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total:
                self._log(step + 1, phase, terms, objects["optimizer"], meter.rate)
            if self.checkpointer is not None and (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.total:
                self.checkpointer.save(step + 1, objects)
        objects["ema"].copy_to(self.model)
        return {"train_seconds": round(time.perf_counter() - begin, 1), "steps": self.total,
                "images_per_second": round(meter.rate, 1), "restarted_codes": self.restarts.restarted}

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor, step: int, objects: dict) -> None:
        """Re-seed codes unused since the last restart with this batch's latents Ŝ, in the live
        quantizer and in the EMA copy that becomes the saved tokenizer."""
        with autocast(self.device, self.cfg.bf16):
            latents_BND = self.tokenizer.encode_latents(x)  # (B, N, D)
        quantizer = self.tokenizer.quantizer
        shadow = objects["ema"].shadow["tokenizer.quantizer.embedding.weight"]
        count = self.restarts.restart(step, quantizer.embedding.weight, latents_BND.reshape(-1, quantizer.code_dim),
                                      optimizer=objects["optimizer"], ema_shadow=shadow,
                                      normalized=quantizer.normalize)
        self.log.info("step %d: restarted %d dead codes", step + 1, count)

    def _optimize(self, loss: torch.Tensor, terms: dict, objects: dict, step: int, lr: float) -> dict:
        check_finite(loss, step, terms)
        optimizer = objects["optimizer"]
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optimizer.step()
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()} | {"lr": lr}

    def _stage1(self, x, index, levels, objects, step) -> dict:
        cfg = self.cfg
        codes = self.targets(x, index, levels)  # (B, h, w) proxy codes of I'_i
        with autocast(self.device, cfg.bf16):
            logits, ids, vq_loss = self.tokenizer(x, levels.to(x.device) + 1)  # prefix i = level + 1
        self.restarts.observe(ids)
        ce = F.cross_entropy(logits.float(), codes)
        loss = ce + vq_loss
        lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=max(cfg.stage1_steps, 1),
                   schedule="cosine", final_lr=cfg.final_lr)
        return self._optimize(loss, {"loss": loss, "ce": ce, "vq": vq_loss}, objects, step, lr)

    def _stage2(self, x, levels, objects, step2) -> dict:
        cfg = self.cfg
        target = pixel_targets(x, levels, self.omegas)
        with autocast(self.device, cfg.bf16):
            with torch.no_grad():
                z_q, _, _ = self.tokenizer.encode(x)
            logits = self.tokenizer.decode(z_q, levels.to(x.device) + 1)
        reconstruction = self.proxy.probs_to_images(logits.float().softmax(dim=1))
        l2 = F.mse_loss(reconstruction, target)
        loss, terms = cfg.l2_weight * l2, {"l2": l2}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, target)
            loss = loss + cfg.perceptual_weight * terms["perceptual"]
        adversarial = cfg.adversarial_weight > 0 and step2 >= cfg.adversarial_start_step
        if adversarial:
            terms["generator_adv"] = -self.discriminator(reconstruction).mean()
            loss = loss + cfg.adversarial_weight * terms["generator_adv"]
        terms["loss"] = loss
        lr = lr_at(step2, base_lr=cfg.stage2_lr, warmup_steps=cfg.stage2_warmup_steps,
                   total_steps=max(cfg.stage2_steps, 1), schedule="cosine", final_lr=cfg.final_lr)
        logged = self._optimize(loss, terms, objects, self.cfg.stage1_steps + step2, lr)
        if adversarial:
            logged |= self._discriminator_step(target, reconstruction.detach(), objects)
        return logged

    def _discriminator_step(self, real, fake, objects) -> dict:
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        reg, self.lecam = lecam_regularizer(real_logits, fake_logits, self.lecam)
        total = d_loss + self.cfg.lecam_weight * reg
        optimizer = objects["disc_optimizer"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return {"disc_loss": float(d_loss.detach()), "lecam": float(reg.detach())}

    def _log(self, step, phase, terms, optimizer, rate) -> None:
        row = {"step": step, "phase": phase, **{k: round(v, 6) for k, v in terms.items()}}
        self.history.append(row)  # results only: the rate is telemetry (log line, MLflow)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        self.log.info("%s images_per_s %.1f", text, rate)
        self.log_metrics({f"train/{k}": v for k, v in terms.items()}, step=step)


# ------------------------------------------------------------------------------------------------
# Evaluation and outputs
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def prefix_figure(codec: SpectralCodec, shards: ImageShards, path: Path, device: torch.device, images: int = 2) -> None:
    """Figure 1 idea: DCT targets I'_i (top) above reconstructions from the first i tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = codec.num_tokens
    prefixes = sorted({min(2 ** k, n) for k in range(n.bit_length() + 1)})
    x = to_float(torch.from_numpy(shards.images(np.arange(images))).permute(0, 3, 1, 2).to(device))
    ids = codec.encode(x)
    fig, axes = plt.subplots(2 * images, len(prefixes), figsize=(1.3 * len(prefixes), 2.7 * images), squeeze=False)
    for row in range(images):
        for col, i in enumerate(prefixes):
            target = band_limit(x[row:row + 1], codec.omegas[i - 1])
            reconstruction = codec.decode(ids[row:row + 1, :i])
            for offset, image, label in ((0, target, f"DCT ω={codec.omegas[i - 1]}"), (1, reconstruction, f"{i} tok")):
                ax = axes[2 * row + offset, col]
                array = ((image[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
                ax.imshow(array.squeeze(-1) if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=1)
                ax.set_title(label, fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def run(ctx) -> dict:
    cfg: TrainTokenizerConfig = ctx.params.train_tokenizer
    device = stage_device(ctx.params.run.device)
    train, val = ImageShards(ctx.args.data, "train"), ImageShards(ctx.args.data, "val")
    proxy = load_proxy(ctx.args.proxy, device)
    # image size and channels: the prepared data's; the proxy codebook: the proxy file's
    tok_cfg = tokenizer_config_for(ctx.params.tokenizer, train.image_shape, proxy.config.codebook_size)
    digest = ctx.params.digest(ctx.sections + ("data", "proxy", "train_proxy", "extract_proxy_codes"))
    checkpointer = Checkpointer(ctx.args.checkpoints, digest)
    trainer = Trainer(tok_cfg, cfg, train, proxy, ctx.args.codes, device, seed=ctx.params.run.seed,
                      checkpointer=checkpointer, log=ctx.log, log_metrics=ctx.tracker.log_metrics)
    fit = trainer.fit()
    out = Path(ctx.args.out)
    codec = SpectralCodec(trainer.tokenizer, proxy, trainer.omegas, soft=cfg.stage2_steps > 0)
    metrics = {**fit, **prefix_psnr(codec, val, cfg.eval_images, device),
               "omegas": list(trainer.omegas), "decode": "soft" if codec.soft else "argmax"}
    with atomic_path(out, directory=True) as tmp:  # the whole folder or nothing
        save_tokenizer(tmp / TOKENIZER_FILE, trainer.tokenizer, proxy, trainer.omegas, codec.soft)
        prefix_figure(codec, val, tmp / "prefixes.png", device)
        write_history(tmp / HISTORY, trainer.history.rows)
        ctx.write_config(tmp, omegas=list(trainer.omegas), grid_size=tok_cfg.grid_size,
                         image_size=tok_cfg.image_size, in_channels=tok_cfg.in_channels,
                         proxy_codebook_size=tok_cfg.proxy_codebook_size)
    for name in ("prefixes.png", HISTORY, CONFIG):
        ctx.tracker.log_artifact(out / name)
    if ctx.params.tracking.log_checkpoints:
        ctx.tracker.log_artifact(out / TOKENIZER_FILE)
    checkpointer.clear()  # only now that every output is written
    ctx.log.info("tokenizer: PSNR full %.2f dB, prefix-1 %.2f dB, usage %.1f%%", metrics["psnr_full"],
                 metrics["psnr_prefix"][0], 100 * metrics["codebook_usage"])
    return metrics
