"""train_tokenizer: Nested Spectral Tokenization (paper §3.2, Algorithm 1), TiTok's two stages.

Stage 1 (steps [0, stage1_steps)): per sample draw i ~ U{1..N}, decode from the prefix s_1..s_i,
cross-entropy against the proxy codes of I'_i = IDCT(DCT(I) ∘ 1_{ω_i}) (``tokenizer.decoder_head:
proxy_codes``, the paper and TiTok) or L2 against the pixels of I'_i (``decoder_head: pixels``), plus
the VQ loss; with
``dead_code_restart_every`` > 0, codes unused for that many steps are re-seeded with encoder outputs.
Stage 2 (the next stage2_steps): encoder and quantizer frozen (token ids unchanged); the
tokenizer's decoder and the proxy decoder (pixel head: the tokenizer's decoder alone) are fine-tuned
to the pixels of I'_i with L2 + perceptual + adversarial (hinge + LeCam) terms.
Table 4 switches live in the ``tokenizer`` section: ``spectral_supervision`` (off: every sample
uses all N tokens and the full image, plain TiTok), ``causal_mask``, ``nonuniform_mapping``.

Multi-GPU / multi-node: launch with torchrun (or ``SPECTRALAR_NPROC_PER_NODE``). ``batch_size`` is the
global batch: every process takes its contiguous slice of the batch one process would take, the
per-sample draws (flips, prefix levels) are made for the global batch and sliced, DDP averages the
gradients, and each process splits its slice into ``micro_batch_size`` passes whose gradients are
accumulated. So 1 process and R processes, with or without accumulation, train the same tokenizer up
to float rounding (tested with 2 gloo processes on CPU). What depends on the whole batch is computed
on the whole batch: dead-code counts and restart latents are gathered from every process, the LeCam
averages take the global mean logits. Rank 0 alone saves checkpoints and writes outputs; every
process resumes from the same checkpoint.
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
from spectralar.model_card import MODEL_CARD, write_model_card
from spectralar.models.codec import SpectralCodec
from spectralar.models.losses import PatchDiscriminator, hinge_d_loss, lecam_regularizer, build_perceptual
from spectralar.evaluation.reconstruction import prefix_psnr
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
from spectralar.spectral import band_limit
from spectralar.artifacts import CONFIG, HISTORY, TOKENIZER_FILE, load_proxy, load_proxy_codes, proxy_code_levels, save_tokenizer, \
    tokenizer_config_for, write_history
from spectralar.config import ConfigError, require
from spectralar.stages.common import Checkpointer, announce_precision, stage_device
from spectralar.training import (EMA, CpuBf16, DeadCodeRestarts, DistributedContext, HistoryRows, Throughput, all_gather_rows,
                                 all_reduce_mean, autocast, build_adamw, check_finite, cleanup, compiled, data_parallel,
                                 gradient_sync, init_distributed, lr_at, progress, set_lr, step_generator)



@dataclass(frozen=True)
class TrainTokenizerConfig:
    batch_size: int = 64  # global batch, split evenly over the processes
    # Images per forward pass on each process: its share of the batch is split into passes of this
    # size whose gradients are accumulated (fewer GPUs, same global batch); 0 = the whole share.
    micro_batch_size: int = 0
    # DataLoader worker processes that read (and for JPEG shards decode) the batches ahead of the
    # step, into pinned memory on CUDA; 0 = the training process reads them (raw shards held in memory).
    loader_workers: int = 0
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
    # No restart after this stage-1 step; 0 = restarts through all of stage 1. On the default, stopping
    # at 2,000 of 6,000 steps left the 16-token PSNR unchanged and codebook usage fell to 57%: codes
    # unused after the last restart stay unused (docs/experiments/2026-12-02-restart-until).
    dead_code_restart_until: int = 0
    augment_hflip: bool = False  # needs extract_proxy_codes.mode: online (codes are of unflipped images)
    # Stage-1 prefix lengths: uniform i ~ U{1..N} (Algorithm 1), linear p(i) ∝ i, or mixed (half each).
    prefix_sampling: Literal["uniform", "linear", "mixed"] = "uniform"
    # linear (and mixed's linear half): p(i) ∝ max(i, floor), so the rarest, coarsest prefixes are drawn
    # as often as prefix ``floor``; 1 = p(i) ∝ i, N or more = uniform.
    prefix_sampling_floor: int = 1
    l2_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_network: Literal["none", "vgg16"] = "none"
    perceptual_weights: str = ""  # vgg16: torchvision's vgg16-397923af.pth
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 0  # counted from the start of stage 2
    lecam_weight: float = 0.001
    discriminator_lr: float = 1e-4
    bf16: bool = True  # autocast on CUDA
    cpu_bf16: CpuBf16 = False  # with bf16: autocast on the CPU too; auto: where matmuls are native bf16 (AVX512-BF16, AMX)
    compile: bool = False  # torch.compile the training forward (after any DDP wrapper)
    checkpoint_every: int = 250
    log_every: int = 50
    eval_images: int = 500

    def __post_init__(self) -> None:
        require(self, "batch_size", "checkpoint_every", "log_every", "eval_images", "prefix_sampling_floor", at_least=1)
        require(self, "stage1_steps", "stage2_steps", "adversarial_start_step", at_least=0)
        require(self, "lr", "stage2_lr", "discriminator_lr", "grad_clip", above=0)
        require(self, "final_lr", "weight_decay", "l2_weight", "perceptual_weight", "adversarial_weight",
                "lecam_weight", at_least=0)
        require(self, "betas", "stage2_betas", "ema_decay", at_least=0, below=1)
        require(self, "warmup_steps", at_least=0, at_most=self.stage1_steps, meaning="at most stage1_steps")
        require(self, "stage2_warmup_steps", at_least=0, at_most=self.stage2_steps, meaning="at most stage2_steps")
        if self.stage1_steps + self.stage2_steps == 0:
            raise ValueError("stage1_steps + stage2_steps must be positive")
        if self.perceptual_weight > 0 and self.perceptual_network == "none":
            raise ValueError("perceptual_weight > 0 needs perceptual_network (vgg16) and its weights")
        require(self, "dead_code_restart_every", at_least=0, meaning="0 = off")
        require(self, "dead_code_restart_until", at_least=0, meaning="0 = through all of stage 1")
        require(self, "micro_batch_size", at_least=0, meaning="0 = each process's whole share of the batch")
        require(self, "loader_workers", at_least=0, meaning="0 = read batches in the training process")
        if self.prefix_sampling not in ("uniform", "linear", "mixed"):
            raise ValueError(f"train_tokenizer.prefix_sampling must be uniform, linear or mixed, "
                             f"got {self.prefix_sampling!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared dataset")
    parser.add_argument("--proxy", default="models/proxy/proxy.pt", help="proxy model file")
    parser.add_argument("--codes", default="data/proxy_codes", help="extract_proxy_codes output")
    parser.add_argument("--out", default="models/tokenizer", help="output directory (tokenizer.pt, figures)")
    parser.add_argument("--checkpoints", default="runs/checkpoints/train_tokenizer", help="resumable checkpoints")


# ------------------------------------------------------------------------------------------------
# Algorithm 1 pieces
# ------------------------------------------------------------------------------------------------

def sample_levels(batch: int, tokenizer_cfg: TokenizerConfig, generator: torch.Generator,
                  prefix_sampling: str = "uniform", floor: int = 1) -> torch.Tensor:
    """0-based level per sample: i-1 with i ~ U{1..N} (Alg. 1 line 4); N-1 without spectral supervision.

    ``prefix_sampling`` other than uniform deviates from Algorithm 1 toward the fine prefixes, which
    carry most of the image's detail, while the coarse ones have few degrees of freedom and converge
    early: ``linear`` draws i with probability ∝ max(i, floor), ``mixed`` is half uniform, half linear
    (floor 1: p(i) = 1/(2N) + i/(N(N+1))). A floor above 1 draws the coarsest prefixes as often as
    prefix ``floor`` (with p(i) ∝ i, prefix 1 is 1 draw in N(N+1)/2) at a small cost to the fine ones.
    """
    n = tokenizer_cfg.num_tokens
    if not tokenizer_cfg.spectral_supervision:
        return torch.full((batch,), n - 1, dtype=torch.long)
    if prefix_sampling in ("linear", "mixed"):
        weights_N = torch.arange(1, n + 1, dtype=torch.float64).clamp(min=floor)
        probabilities_N = weights_N / weights_N.sum()  # p(i) ∝ max(i, floor)
        if prefix_sampling == "mixed":
            probabilities_N = 0.5 * probabilities_N + 0.5 / n
        return torch.multinomial(probabilities_N, batch, replacement=True, generator=generator)
    return torch.randint(0, n, (batch,), generator=generator)


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

class Stage2Reconstruction(nn.Module):
    """Stage 2's trainable forward, the module DDP wraps: the frozen encoder's codes, decoded from each
    sample's prefix, then (proxy-code head) through the proxy decoder: images (B, C, H, W)."""

    def __init__(self, tokenizer: NestedSpectralTokenizer, proxy, pixel_head: bool, bf16: bool,
                 cpu_bf16: CpuBf16 = False) -> None:
        super().__init__()
        self.tokenizer, self.proxy = tokenizer, proxy
        self.pixel_head, self.bf16, self.cpu_bf16 = pixel_head, bf16, cpu_bf16

    def forward(self, x: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.bf16, self.cpu_bf16):
            with torch.no_grad():
                z_q, _, _ = self.tokenizer.encode(x)  # (B, N, D), encoder and quantizer frozen
            output = self.tokenizer.decode(z_q, prefix_lengths)
        if self.pixel_head:
            return output.float()  # (B, C, H, W)
        return self.proxy.probs_to_images(output.float().softmax(dim=1))  # (B, C, H, W)


class LeCamAverages:
    """Moving averages of the discriminator's mean logits on real and fake images (LeCam). A checkpoint
    object: a run resumed inside stage 2 regularises exactly as an uninterrupted one."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(2, device=device)  # EMA of mean D(real), mean D(fake)

    def state_dict(self) -> dict:
        return {"values": self.values.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device)


class Trainer:
    """Algorithm 1 with TiTok's two stages, over explicit values (no params file, no stage context);
    data-parallel when ``dist`` spans several processes.

    Args:
        tok_cfg: the complete tokenizer config (image size, channels and proxy codebook filled in).
        cfg: optimiser, schedule and loss settings.
        train: the prepared training split.
        proxy: the trained proxy (its decoder is fine-tuned in stage 2).
        codes_dir: extract_proxy_codes' output (the stage-1 targets, or online mode).
        device, seed: where, and the seed of data order, levels and restarts.
        dist: the process group context (``spectralar.training.init_distributed``; None: one process
            on ``device``).
        checkpointer: resumable checkpoints (None: none).
        log, log_metrics: a logger, and a sink for ``{name: value}, step=`` training curves.
    ``fit()`` trains; ``history`` holds the logged rows.
    """

    def __init__(self, tok_cfg: TokenizerConfig, cfg: TrainTokenizerConfig, train: ImageShards, proxy,
                 codes_dir: str | Path, device: torch.device, *, seed: int,
                 dist: Optional[DistributedContext] = None, checkpointer: Optional[Checkpointer] = None,
                 log: logging.Logger = logging.getLogger(__name__),
                 log_metrics: Callable[..., None] = lambda metrics, step=None: None) -> None:
        self.cfg, self.tok_cfg, self.seed = cfg, tok_cfg, seed
        self.dist = dist if dist is not None else DistributedContext(0, 0, 1, torch.device(device), True)
        self.device = self.dist.device
        self.log, self.log_metrics = log, log_metrics
        self.omegas = tok_cfg.omegas
        self.train = train
        self.proxy = proxy
        self.local_batch, self.micro_batch = self._batch_split()
        self.pixel_head = self.tok_cfg.decoder_head == "pixels"
        if not self.pixel_head and tok_cfg.grid_size != proxy.config.grid_size:
            raise ConfigError(f"tokenizer.patch_size: {tok_cfg.patch_size} gives a {tok_cfg.grid_size}x{tok_cfg.grid_size} "
                              f"patch grid but the proxy's code grid is {proxy.config.grid_size}x{proxy.config.grid_size} "
                              f"(with decoder_head: proxy_codes, patch_size must equal the proxy's downsample factor)")
        self.tokenizer = NestedSpectralTokenizer(self.tok_cfg).to(self.device)
        self.model = nn.ModuleDict({"tokenizer": self.tokenizer, "proxy": self.proxy})
        # a pixel head regresses I'_i itself: the proxy codes are neither read nor needed
        self.targets = None if self.pixel_head else ProxyTargets(codes_dir, self.proxy, self.omegas, self.tok_cfg)
        if self.cfg.augment_hflip and self.targets is not None and not self.targets.online:
            raise ValueError("train_tokenizer.augment_hflip needs extract_proxy_codes.mode: online "
                             "(precomputed codes are of unflipped images)")
        self.total = self.cfg.stage1_steps + self.cfg.stage2_steps
        self.checkpointer = checkpointer
        self.restarts = DeadCodeRestarts(self.tok_cfg.codebook_size, self.cfg.dead_code_restart_every,
                                         seed=self.seed, device=self.device, until=self.cfg.dead_code_restart_until)
        self.history = HistoryRows()  # checkpointed: a resumed run writes the whole curve

    def _batch_split(self) -> tuple[int, int]:
        """(images per process per step, images per forward pass) from the global batch."""
        batch, world_size, micro = self.cfg.batch_size, self.dist.world_size, self.cfg.micro_batch_size
        if batch % world_size:
            raise ConfigError(f"train_tokenizer.batch_size: {batch} is not divisible by the {world_size} processes")
        local = batch // world_size
        micro = min(micro or local, local)
        if local % micro:
            raise ConfigError(f"train_tokenizer.micro_batch_size: {micro} does not divide the {local} images of each "
                              f"process (batch_size {batch} over {world_size} processes)")
        return local, micro

    def micro_batches(self) -> list[slice]:
        """This process's share of a step, as the slices of its forward passes."""
        return [slice(start, start + self.micro_batch) for start in range(0, self.local_batch, self.micro_batch)]

    def step_inputs(self, step: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's images (flipped with ``augment_hflip``) and 0-based prefix levels at ``step``.

        The flips and levels are drawn for the whole global batch from the step's generator and
        sliced, so every process count (and a resumed run) draws the same value for each image.
        """
        generator = step_generator(self.seed, step)
        mine = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        if self.cfg.augment_hflip:
            flip = (torch.rand(self.cfg.batch_size, generator=generator) < 0.5)[mine]
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        levels = sample_levels(self.cfg.batch_size, self.tok_cfg, generator, self.cfg.prefix_sampling,
                               self.cfg.prefix_sampling_floor)[mine]
        return x, levels

    # -- phase set-up -------------------------------------------------------------------------
    def _phase_objects(self, phase: int) -> dict:
        cfg = self.cfg
        self.net = None  # drop the previous phase's DDP wrapper (and its gradient hooks) first
        if phase == 1:
            for p in self.proxy.parameters():
                p.requires_grad_(False)
            optimizer = build_adamw(self.tokenizer, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
            objects = {"model": self.model, "optimizer": optimizer}
            self.net = compiled(data_parallel(self.tokenizer, self.dist), cfg.compile)
        else:
            trainable = (self.tokenizer.decoder,) if self.pixel_head else (self.tokenizer.decoder, self.proxy.decoder)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for module in trainable:
                for p in module.parameters():
                    p.requires_grad_(True)
            optimizer = build_adamw(nn.ModuleList(trainable), lr=cfg.stage2_lr, betas=cfg.stage2_betas,
                                    weight_decay=cfg.weight_decay)
            objects = {"model": self.model, "optimizer": optimizer}
            # built after requires_grad is set: DDP averages the gradients of the trainable decoders only
            stage2 = Stage2Reconstruction(self.tokenizer, self.proxy, self.pixel_head, cfg.bf16, cfg.cpu_bf16)
            self.net = compiled(data_parallel(stage2, self.dist), cfg.compile)
            if cfg.adversarial_weight > 0:
                self.discriminator = PatchDiscriminator(self.tok_cfg.in_channels).to(self.device)
                self.discriminator_net = data_parallel(self.discriminator, self.dist)
                self.lecam = LeCamAverages(self.device)
                objects["discriminator"] = self.discriminator
                objects["disc_optimizer"] = torch.optim.Adam(self.discriminator.parameters(),
                                                             lr=cfg.discriminator_lr, betas=(0.5, 0.999))
                objects["lecam"] = self.lecam
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
                             total_steps=self.total, rank=self.dist.rank, world_size=self.dist.world_size,
                             in_memory=self.train.format == "raw", workers=self.cfg.loader_workers)
        self.bar = progress(loader, total=self.total, initial=start, desc="train_tokenizer", unit="step",
                            log_every=self.cfg.log_every, logger=self.log, enabled=self.dist.is_main)
        for step, (images, _, index) in enumerate(self.bar, start=start):
            if phase == 1 and step >= self.cfg.stage1_steps:
                objects["ema"].copy_to(self.model)  # stage 2 starts from the EMA of stage 1 (TiTok)
                phase, objects = 2, self._phase_objects(2)
            x = to_float(images.to(self.device, non_blocking=True))  # (b, C, H, W): this process's share
            x, levels = self.step_inputs(step, x)
            terms = self._stage1(x, index, levels, objects, step) if phase == 1 else \
                self._stage2(x, levels, objects, step - self.cfg.stage1_steps)
            objects["ema"].update(self.model)
            # no restart at the last stage-1 step: stage 2 freezes the codes, none could be trained
            if phase == 1 and self.restarts.due(step) and step + 1 < self.cfg.stage1_steps:
                self._restart_dead_codes(x, step, objects)
            meter.update(self.cfg.batch_size)
            self.bar.set_postfix(phase=phase, **{k: terms[k] for k in ("loss", "lr") if k in terms})
            if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total:
                self._log(step + 1, phase, terms)
            if (self.checkpointer is not None and (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.total
                    and self.dist.is_main):
                self.checkpointer.save(step + 1, objects)
        objects["ema"].copy_to(self.model)
        return {"train_seconds": round(time.perf_counter() - begin, 1), "steps": self.total,
                "resumed_from_step": start, "images_per_second": round(meter.rate, 1),
                "restarted_codes": self.restarts.restarted}

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor, step: int, objects: dict) -> None:
        """Re-seed codes unused since the last restart with latents Ŝ of this step's global batch, in the
        live quantizer and in the EMA copy that becomes the saved tokenizer. The latents are gathered
        from every process in rank order, so every process (and one process alone) picks the same rows."""
        with autocast(self.device, self.cfg.bf16, self.cfg.cpu_bf16):
            latents_bND = torch.cat([self.tokenizer.encode_latents(x[part]) for part in self.micro_batches()])
        latents_BND = all_gather_rows(latents_bND)  # (B, N, D), the global batch
        quantizer = self.tokenizer.quantizer
        shadow = objects["ema"].shadow["tokenizer.quantizer.embedding.weight"]
        count = self.restarts.restart(step, quantizer.embedding.weight, latents_BND.reshape(-1, quantizer.code_dim),
                                      optimizer=objects["optimizer"], ema_shadow=shadow,
                                      normalized=quantizer.normalize)
        if self.dist.is_main:
            self.log.info("step %d: restarted %d dead codes", step + 1, count)

    def _accumulate(self, loss_of: Callable[[slice], tuple[torch.Tensor, dict]], optimizer) -> dict:
        """Forward and backward every micro-batch of this process (DDP averages the gradients over the
        processes at the last one); returns the loss terms averaged over the micro-batches."""
        parts = self.micro_batches()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for number, part in enumerate(parts):
            with gradient_sync(self.net, sync=number == len(parts) - 1):
                loss, terms = loss_of(part)
                (loss / len(parts)).backward()  # equal micro-batches: the mean of means is the batch mean
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach().float() / len(parts)
        return sums

    def _optimize(self, terms: dict, optimizer, step: int, lr: float) -> dict:
        """The step's loss terms averaged over the processes and checked, the gradient clipped, the update
        applied; returns the terms as floats with the gradient norm and the learning rate."""
        names = list(terms)
        means = all_reduce_mean(torch.stack([terms[name] for name in names]))  # one collective for all terms
        terms = dict(zip(names, means))
        check_finite(terms["loss"], step, terms)
        set_lr(optimizer, lr)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optimizer.step()
        return {k: float(v) for k, v in terms.items()} | {"lr": lr}

    def _stage1(self, x, index, levels, objects, step) -> dict:
        cfg = self.cfg
        ids = []

        def loss_of(part: slice) -> tuple[torch.Tensor, dict]:
            loss, terms, ids_bN = self._stage1_loss(x[part], index[part], levels[part])
            ids.append(ids_bN)
            return loss, terms

        terms = self._accumulate(loss_of, objects["optimizer"])
        if self.restarts.enabled:  # the global batch's codes: the counts are equal on every process
            self.restarts.observe(all_gather_rows(torch.cat(ids)))
        lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=max(cfg.stage1_steps, 1),
                   schedule="cosine", final_lr=cfg.final_lr)
        return self._optimize(terms, objects["optimizer"], step, lr)

    def _stage1_loss(self, x, index, levels) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, its terms, code ids (b, N)) of one micro-batch: reconstruction of I'_i + VQ loss."""
        if self.pixel_head:
            target = pixel_targets(x, levels, self.omegas)  # (b, C, H, W) I'_i
        else:
            codes = self.targets(x, index, levels)  # (b, h, w) proxy codes of I'_i
        with autocast(self.device, self.cfg.bf16, self.cfg.cpu_bf16):
            output, ids, vq_loss = self.net(x, levels.to(x.device) + 1)  # prefix i = level + 1
        if self.pixel_head:
            reconstruction = self._band_limited(output.float(), levels)
            reconstruction_term = {"l2": F.mse_loss(reconstruction, target)}
        else:
            reconstruction_term = {"ce": F.cross_entropy(output.float(), codes)}
        loss = next(iter(reconstruction_term.values())) + vq_loss
        return loss, {"loss": loss, **reconstruction_term, "vq": vq_loss}, ids

    def _band_limited(self, images_BCHW: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """With ``band_limited_output``, prefix i's output projected onto its ω_i block (as decode does)."""
        if not self.tok_cfg.band_limited_output:
            return images_BCHW
        return band_limit(images_BCHW, torch.tensor(self.omegas, device=images_BCHW.device)[levels.to(images_BCHW.device)])

    def _stage2(self, x, levels, objects, step2) -> dict:
        cfg = self.cfg
        adversarial = cfg.adversarial_weight > 0 and step2 >= cfg.adversarial_start_step
        reals, fakes = [], []

        def loss_of(part: slice) -> tuple[torch.Tensor, dict]:
            target, reconstruction, terms = self._stage2_loss(x[part], levels[part], adversarial)
            reals.append(target)
            fakes.append(reconstruction.detach())
            return terms["loss"], terms

        terms = self._accumulate(loss_of, objects["optimizer"])
        lr = lr_at(step2, base_lr=cfg.stage2_lr, warmup_steps=cfg.stage2_warmup_steps,
                   total_steps=max(cfg.stage2_steps, 1), schedule="cosine", final_lr=cfg.final_lr)
        logged = self._optimize(terms, objects["optimizer"], cfg.stage1_steps + step2, lr)
        if adversarial:
            logged |= self._discriminator_step(torch.cat(reals), torch.cat(fakes), objects)
        return logged

    def _stage2_loss(self, x, levels, adversarial: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(target I'_i, reconstruction, loss terms) of one micro-batch: L2 + perceptual + adversarial."""
        cfg = self.cfg
        target = pixel_targets(x, levels, self.omegas)  # (b, C, H, W)
        reconstruction = self._band_limited(self.net(x, levels.to(x.device) + 1), levels)  # (b, C, H, W)
        l2 = F.mse_loss(reconstruction, target)
        loss, terms = cfg.l2_weight * l2, {"l2": l2}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, target)
            loss = loss + cfg.perceptual_weight * terms["perceptual"]
        if adversarial:  # the unwrapped discriminator: its gradients here are discarded by its own step
            terms["generator_adv"] = -self.discriminator(reconstruction).mean()
            loss = loss + cfg.adversarial_weight * terms["generator_adv"]
        terms["loss"] = loss
        return target, reconstruction, terms

    def _discriminator_step(self, real, fake, objects) -> dict:
        """Hinge + LeCam on this process's real and fake images, in one pass (so DDP averages the
        discriminator's gradients); the LeCam averages take the global batch's mean logits."""
        logits = self.discriminator_net(torch.cat([real, fake]))  # (2b, 1, h, w), GroupNorm: per image
        real_logits, fake_logits = logits.chunk(2)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        means = all_reduce_mean(torch.stack([real_logits.mean(), fake_logits.mean()]).detach())
        reg, self.lecam.values = lecam_regularizer(real_logits, fake_logits, self.lecam.values, means=means)
        total = d_loss + self.cfg.lecam_weight * reg
        optimizer = objects["disc_optimizer"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        logged = all_reduce_mean(torch.stack([d_loss.detach(), reg.detach()]))
        return {"disc_loss": float(logged[0]), "lecam": float(logged[1])}

    def _log(self, step, phase, terms) -> None:
        """A history row (results only: the rate is telemetry, on the progress line) on every process,
        so rank 0's checkpoints carry it; the MLflow curves from rank 0."""
        row = {"step": step, "phase": phase, **{k: round(v, 6) for k, v in terms.items()}}
        self.history.append(row)
        if self.dist.is_main:
            self.log_metrics({f"train_{k}": v for k, v in terms.items()}, step=step)


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


def _write_outputs(ctx, trainer: Trainer, codec: SpectralCodec, val: ImageShards, metrics: dict) -> None:
    """The tokenizer folder (whole or nothing) and its MLflow records; rank 0 only."""
    out, tok_cfg, device = Path(ctx.args.out), trainer.tok_cfg, trainer.device
    with atomic_path(out, directory=True) as tmp:  # the whole folder or nothing
        save_tokenizer(tmp / TOKENIZER_FILE, trainer.tokenizer, trainer.proxy, trainer.omegas, codec.soft)
        prefix_figure(codec, val, tmp / "prefixes.png", device)
        write_history(tmp / HISTORY, trainer.history.rows)
        ctx.write_config(tmp, omegas=list(trainer.omegas), grid_size=tok_cfg.grid_size,
                         image_size=tok_cfg.image_size, in_channels=tok_cfg.in_channels,
                         proxy_codebook_size=tok_cfg.proxy_codebook_size, world_size=trainer.dist.world_size)
        write_model_card(tmp, TOKENIZER_FILE, metrics, data=ctx.args.data)
    for name in ("prefixes.png", HISTORY, CONFIG, MODEL_CARD):
        ctx.tracker.log_artifact(out / name)
    if ctx.params.tracking.log_checkpoints:
        ctx.tracker.log_artifact(out / TOKENIZER_FILE)
    if ctx.tracker.active:  # an MLflow model: mlflow.pytorch.load_model(uri) gives the SpectralCodec back
        x = to_float(torch.from_numpy(val.images(np.arange(2))).permute(0, 3, 1, 2).to(device))
        ids_BN = codec.encode(x)  # the signature: ids -> images
        ctx.tracker.log_model("tokenizer", codec, ids_BN, codec.decode(ids_BN))


def run(ctx) -> dict:
    cfg: TrainTokenizerConfig = ctx.params.train_tokenizer
    stage_device(ctx.params.run.device)  # TF32 matmuls on CUDA
    dist = init_distributed(device_preference=ctx.params.run.device)
    device = dist.device
    try:
        announce_precision(ctx, device, cfg.bf16, cfg.cpu_bf16)
        train, val = ImageShards(ctx.args.data, "train"), ImageShards(ctx.args.data, "val")
        proxy = load_proxy(ctx.args.proxy, device)
        # image size and channels: the prepared data's; the proxy codebook: the proxy file's
        tok_cfg = tokenizer_config_for(ctx.params.tokenizer, train.image_shape, proxy.config.codebook_size)
        digest = ctx.params.digest(ctx.sections + ("data", "proxy", "train_proxy", "extract_proxy_codes"))
        checkpointer = Checkpointer(ctx.args.checkpoints, digest)
        trainer = Trainer(tok_cfg, cfg, train, proxy, ctx.args.codes, device, seed=ctx.params.run.seed, dist=dist,
                          checkpointer=checkpointer, log=ctx.log, log_metrics=ctx.tracker.log_metrics)
        fit = trainer.fit()
        if not dist.is_main:
            return {**fit, "world_size": dist.world_size}  # rank 0 evaluates and writes every output
        codec = SpectralCodec(trainer.tokenizer, proxy, trainer.omegas, soft=cfg.stage2_steps > 0)
        metrics = {**fit, "world_size": dist.world_size, **prefix_psnr(codec, val, cfg.eval_images, device),
                   "omegas": list(trainer.omegas), "decode": codec.decode_mode}
        _write_outputs(ctx, trainer, codec, val, metrics)
        checkpointer.clear()  # only now that every output is written
        ctx.log.info("tokenizer: PSNR full %.2f dB, prefix-1 %.2f dB, usage %.1f%%", metrics["psnr_full"],
                     metrics["psnr_prefix"][0], 100 * metrics["codebook_usage"])
        return metrics
    finally:
        cleanup()
