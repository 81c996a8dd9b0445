"""train_generator: the class-conditional spectral AR generator, VAR's recipe (paper §3.3, §4.1).

Next-token prediction over the N spectral token ids of each image (eq. 8), the class embedding as
the start token, labels dropped to the null class with probability ``generator.class_dropout`` for
classifier-free guidance. Recipe (VAR's paper and code): AdamW betas (0.9, 0.95), weight decay 0.05, peak
lr = base_lr * batch / 256, linear warmup then linear decay to ``final_lr`` (VAR's "lin0"), gradient
clipping 2.0, EMA of the weights, bf16 autocast on CUDA (and on the CPU with ``cpu_bf16``).

Multi-GPU / multi-node: launch with torchrun; every rank takes its contiguous slice of the same
global batch (``spectralar.data.loader.global_batch_indices``) and the label dropout is drawn on
the global batch from a per-step generator, so 1 process and R processes with the same global
batch train the same model (tested with 2 gloo processes on CPU) -- up to drop path and dropout,
whose masks are drawn per sample on each rank. Those draws come from the global RNG reseeded at
every step from (seed, step, rank), so a resumed run repeats them without any saved RNG state.
Checkpoints and resume work as in train_tokenizer: rank 0 saves, every rank loads.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import logging
from typing import Callable

from spectralar.artifacts import CONFIG, GENERATOR_FILE, HISTORY, generator_config_for, load_tokens, save_generator, \
    write_history
from spectralar.config import ConfigError, require
from spectralar.data.loader import global_batch_indices
from spectralar.io import atomic_path
from spectralar.model_card import MODEL_CARD, write_model_card
from spectralar.models.generator import GeneratorConfig, SpectralGPT
from spectralar.stages.common import Checkpointer, announce_precision, stage_device
from spectralar.training import (
    EMA,
    HistoryRows,
    Throughput,
    all_reduce_mean,
    CpuBf16,
    autocast,
    build_adamw,
    check_finite,
    cleanup,
    compiled,
    init_distributed,
    lr_at,
    mfu,
    model_flops_per_sample,
    peak_flops,
    progress,
    set_lr,
    step_generator,
)



@dataclass(frozen=True)
class TrainGeneratorConfig:
    batch_size: int = 64  # global batch, split evenly over the processes
    steps: int = 300
    base_lr: float = 1e-4  # VAR: peak lr = base_lr * batch_size / 256
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 30  # VAR: epochs / 50
    final_lr: float = 1e-6
    grad_clip: float = 2.0
    ema_decay: float = 0.999
    bf16: bool = True  # autocast on CUDA
    cpu_bf16: CpuBf16 = False  # with bf16: training autocasts on the CPU too; auto: where bf16 is native (AVX512-BF16, AMX)
    compile: bool = False  # torch.compile the training forward (after any DDP wrapper)
    checkpoint_every: int = 100
    log_every: int = 25
    val_images: int = 1000  # held-out teacher-forced loss/accuracy on the EMA weights (0 = skip)

    def __post_init__(self) -> None:
        require(self, "batch_size", "steps", "checkpoint_every", "log_every", at_least=1)
        require(self, "warmup_steps", at_least=0, at_most=self.steps, meaning="at most steps")
        require(self, "base_lr", "grad_clip", above=0)
        require(self, "final_lr", "weight_decay", at_least=0)
        require(self, "betas", "ema_decay", at_least=0, below=1)
        require(self, "val_images", at_least=0, meaning="0 = skip the held-out evaluation")

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="data/tokens", help="dump_tokens output")
    parser.add_argument("--out", default="models/generator", help="output directory (generator.pt, history.csv)")
    parser.add_argument("--checkpoints", default="runs/checkpoints/train_generator", help="resumable checkpoints")


# ------------------------------------------------------------------------------------------------
# Model pieces
# ------------------------------------------------------------------------------------------------

class TeacherForced(nn.Module):
    """SpectralGPT's training forward without its own label dropout.

    The labels arrive already dropped (on the global batch, so the result does not depend on the
    number of processes); this is the module DistributedDataParallel wraps.
    """

    def __init__(self, model: SpectralGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        k, n = self.model.config.tokens_per_step, ids_BN.shape[1]
        cond_BC = self.model.class_condition(labels_B)  # (B, C)
        return self.model.logits_from_prefix(cond_BC, ids_BN[:, : n - k])  # (B, N, V)


def matmul_parameters(model: SpectralGPT) -> int:
    """Parameters that cost matmul FLOPs: all but the embedding tables (PaLM's MFU accounting)."""
    tables = {"class_embedding.weight", "token_embedding.weight", "position_embedding"}
    return sum(p.numel() for name, p in model.named_parameters() if name not in tables)


def flops_per_image(model: SpectralGPT) -> float:
    """Training FLOPs per image of N tokens: N·(6·P + 12·L·N·C) + 6·P_AdaLN, the AdaLN projections
    acting once per image, the other P once per token (spectralar.training.meter)."""
    cfg, per_image = model.config, model.per_image_parameters()
    return model_flops_per_sample(matmul_parameters(model) - per_image, cfg.num_tokens, layers=cfg.depth,
                                  width=cfg.resolved_width, per_sample_parameters=per_image)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG at ``step`` on ``rank`` (drop path, dropout): resume needs no RNG state."""
    return (seed * 1_000_003 + step) * 1_009 + rank


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

class History(HistoryRows):
    """Logged rows plus the loss/accuracy sums of the current log window; checkpointed, so a
    resumed run writes the same history.csv as an uninterrupted one."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.window = torch.zeros(2, device=device)  # sums of loss and accuracy since the last log
        self.window_steps = 0

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor) -> None:
        self.window += torch.stack((loss, accuracy))
        self.window_steps += 1

    def take_means(self) -> torch.Tensor:
        """Window means (loss, accuracy), averaged over processes; starts a new window."""
        means = all_reduce_mean(self.window / self.window_steps)
        self.window.zero_()
        self.window_steps = 0
        return means

    def state_dict(self) -> dict:
        return {**super().state_dict(), "window": self.window.cpu(), "window_steps": self.window_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window = state["window"].to(self.window.device)
        self.window_steps = int(state["window_steps"])


class Trainer:
    """VAR's recipe over explicit values (no params file, no stage context); data-parallel when
    ``dist`` spans several processes.

    Args:
        model_cfg: the complete generator config (N, vocabulary and classes filled in).
        cfg: optimiser and schedule settings.
        ids, labels: the training token table (images, N) and its labels.
        dist: the process group context (``spectralar.training.init_distributed``).
        seed: data order, label dropout, drop path.
        checkpointer: resumable checkpoints (None: none).
        log, log_metrics: a logger, and a sink for ``{name: value}, step=`` training curves.
        val: held-out (ids, labels): every ``checkpoint_every`` steps and at the end, the EMA weights'
            teacher-forced loss and accuracy on its first ``val_images`` sequences go into the
            history (``val_loss``, ``val_accuracy``: the validation curves); None = no curve.
    """

    def __init__(self, model_cfg: GeneratorConfig, cfg: "TrainGeneratorConfig", ids: np.ndarray, labels: np.ndarray,
                 dist, *, seed: int, checkpointer: Optional[Checkpointer] = None,
                 log: logging.Logger = logging.getLogger(__name__),
                 log_metrics: Callable[..., None] = lambda metrics, step=None: None,
                 val: Optional[tuple[np.ndarray, np.ndarray]] = None) -> None:
        self.cfg, self.model_cfg, self.seed = cfg, model_cfg, seed
        self.log, self.log_metrics = log, log_metrics
        self.dist, self.device = dist, dist.device
        self.ids, self.labels = ids, labels
        self.val = val if cfg.val_images else None
        if self.cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"train_generator.batch_size: {self.cfg.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes")
        self.local_batch = self.cfg.batch_size // self.dist.world_size
        self.model = SpectralGPT(self.model_cfg).to(self.device)
        self.net: nn.Module = TeacherForced(self.model)
        if self.dist.is_distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)
        self.net = compiled(self.net, cfg.compile)
        self.checkpointer = checkpointer
        self.history = History(self.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of ``step``: ids (b, N), labels (b,) after dropout."""
        index = global_batch_indices(step, num_items=len(self.ids), batch_size=self.cfg.batch_size, seed=self.seed)
        labels_B = torch.from_numpy(self.labels[index])
        # CFG label dropout on the *global* batch from a per-step generator: every process count and a
        # resumed run drop the same labels (the model is in training mode, so drop_labels draws).
        labels_B = self.model.drop_labels(labels_B, step_generator(self.seed, step))
        mine = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        ids_bN = torch.from_numpy(self.ids[index[mine]].astype(np.int64))
        return ids_bN.to(self.device, non_blocking=True), labels_B[mine].to(self.device, non_blocking=True)

    def fit(self) -> dict:
        cfg = self.cfg
        optimizer = build_adamw(self.model, lr=cfg.peak_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        objects = {"model": self.model, "optimizer": optimizer, "ema": EMA(self.model, cfg.ema_decay, warmup=True),
                   "history": self.history}
        start = self.checkpointer.resume(objects) if self.checkpointer is not None else 0
        self.model.train()
        meter, begin = Throughput(), time.perf_counter()
        self.bar = progress(range(start, cfg.steps), total=cfg.steps, initial=start, desc="train_generator",
                            log_every=cfg.log_every, unit="step", enabled=self.dist.is_main, logger=self.log)
        for step in self.bar:
            terms = self._train_step(step, optimizer)
            self.history.add(terms["loss"], terms["accuracy"])
            objects["ema"].update(self.model)
            meter.update(self.cfg.batch_size)
            validate = self.val is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or validate:
                curve = self._validate(objects["ema"]) if validate else {}
                self._log(step + 1, self.history.take_means(), terms, meter.rate, curve)
            if (self.checkpointer is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
                    and self.dist.is_main):
                self.checkpointer.save(step + 1, objects)
        objects["ema"].copy_to(self.model)
        seconds = time.perf_counter() - begin
        return {"train_seconds": round(seconds, 1), "steps": cfg.steps, "resumed_from_step": start,
                "images_per_second": round(meter.rate, 1),
                "tokens_per_second": round(meter.rate * self.model_cfg.num_tokens, 1)}

    def _train_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        cfg = self.cfg
        ids_bN, labels_b = self.batch(step)
        torch.manual_seed(step_seed(self.seed, step, self.dist.rank))  # drop path draws
        with autocast(self.device, cfg.bf16, cfg.cpu_bf16):
            logits_bNV = self.net(ids_bN, labels_b)
        logits_bNV = logits_bNV.float()
        loss = F.cross_entropy(logits_bNV.flatten(0, 1), ids_bN.flatten())
        check_finite(loss, step, {"loss": loss})
        lr = lr_at(step, base_lr=cfg.peak_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                   schedule="linear", final_lr=cfg.final_lr)
        set_lr(optimizer, lr)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        optimizer.step()
        # Gradients freed as soon as the step has used them, not at the next step's start: the EMA
        # update, the validation's copy of the model and a checkpoint then run without a model-sized
        # gradient copy beside them (at d16, 1.25 GB less at every validation).
        optimizer.zero_grad(set_to_none=True)
        accuracy = (logits_bNV.detach().argmax(-1) == ids_bN).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy, "grad_norm": grad_norm.detach(), "lr": lr}

    def _validate(self, ema: EMA) -> dict:
        """The EMA weights' held-out loss and accuracy (what the stage reports at the end), on a copy:
        the live weights and their optimizer state are untouched."""
        model = copy.deepcopy(self.model)
        ema.copy_to(model)
        scores = evaluate(model, *self.val, self.cfg.val_images, self.device, self.cfg.bf16)
        return {"val_loss": scores["val_loss"], "val_accuracy": scores["val_accuracy"]}

    def _log(self, step: int, means: torch.Tensor, terms: dict, images_per_second: float,
             curve: Optional[dict] = None) -> None:
        loss, accuracy = (float(v) for v in means.cpu())
        row = {"step": step, "loss": loss, "accuracy": accuracy, "lr": terms["lr"],
               "grad_norm": float(terms["grad_norm"]), **(curve or {})}
        self.history.append(row)  # results only: the rate is telemetry (log line, MLflow)
        tokens_per_second = round(images_per_second * self.model_cfg.num_tokens, 1)
        if self.dist.is_main:
            self.bar.set_postfix(loss=loss, acc=accuracy, lr=row["lr"], grad=row["grad_norm"],
                                 tok_per_s=round(tokens_per_second))
            # One name per quantity: the curve's keys are the metrics file's (train_loss, ...).
            self.log_metrics({**{f"train_{k}": v for k, v in row.items() if k != "step"},
                              "train_tokens_per_s": tokens_per_second}, step=step)


@torch.no_grad()
def evaluate(model: SpectralGPT, ids: np.ndarray, labels: np.ndarray, count: int, device: torch.device,
             bf16: bool, batch_size: int = 500) -> dict:
    """Teacher-forced loss / next-token accuracy on the first ``count`` sequences (true labels)."""
    model.eval()
    net, count = TeacherForced(model), min(count, len(ids))
    loss_sum, correct = 0.0, 0.0
    for start in range(0, count, batch_size):
        ids_BN = torch.from_numpy(ids[start:start + batch_size][: count - start].astype(np.int64)).to(device)
        labels_B = torch.from_numpy(labels[start:start + len(ids_BN)]).to(device)
        with autocast(device, bf16):
            logits_BNV = net(ids_BN, labels_B).float()
        loss_sum += float(F.cross_entropy(logits_BNV.flatten(0, 1), ids_BN.flatten(), reduction="sum"))
        correct += float((logits_BNV.argmax(-1) == ids_BN).sum())
    tokens = count * ids.shape[1]
    return {"val_loss": round(loss_sum / tokens, 5), "val_accuracy": round(correct / tokens, 5), "val_images": count}


def _write_outputs(ctx, trainer: Trainer, manifest: dict, metrics: dict) -> None:
    out = Path(ctx.args.out)
    extra = {"class_names": list(manifest["class_names"]), "omegas": list(manifest["omegas"]),
             "tokenizer_sha256": manifest["tokenizer_sha256"], "steps": trainer.cfg.steps}
    model_cfg = trainer.model_cfg
    with atomic_path(out, directory=True) as tmp:
        save_generator(tmp / GENERATOR_FILE, trainer.model, extra)
        write_history(tmp / HISTORY, trainer.history.rows)
        ctx.write_config(tmp, peak_lr=trainer.cfg.peak_lr, world_size=trainer.dist.world_size,
                         num_tokens=model_cfg.num_tokens, vocab_size=model_cfg.vocab_size,
                         num_classes=model_cfg.num_classes, width=model_cfg.resolved_width,
                         heads=model_cfg.resolved_heads, drop_path_rate=model_cfg.resolved_drop_path_rate,
                         parameters=metrics["parameters"])
        write_model_card(tmp, GENERATOR_FILE, metrics, data=ctx.args.tokens)
    for name in (HISTORY, CONFIG, MODEL_CARD):
        ctx.tracker.log_artifact(out / name)
    if ctx.params.tracking.log_checkpoints:
        ctx.tracker.log_artifact(out / GENERATOR_FILE)
    if ctx.tracker.active:  # an MLflow model: mlflow.pytorch.load_model(uri) gives the SpectralGPT back
        ids_BN = torch.from_numpy(trainer.ids[:2].astype(np.int64)).to(trainer.device)
        labels_B = torch.from_numpy(trainer.labels[:2].astype(np.int64)).to(trainer.device)
        with torch.no_grad():
            logits_BNV = trainer.model.eval()(ids_BN, labels_B)  # the signature: ids, labels -> logits
        ctx.tracker.log_model("generator", trainer.model, {"ids": ids_BN, "labels": labels_B}, logits_BNV)


def run(ctx) -> dict:
    stage_device(ctx.params.run.device)  # TF32 matmuls on CUDA
    dist = init_distributed(device_preference=ctx.params.run.device)
    announce_precision(ctx, dist.device, ctx.params.train_generator.bf16, ctx.params.train_generator.cpu_bf16)
    manifest, ids, labels = load_tokens(ctx.args.tokens, "train")
    # N, vocabulary and classes: the token dump's (the tokenizer's and the dataset's)
    model_cfg = generator_config_for(ctx.params.generator, manifest, f"{Path(ctx.args.tokens) / 'manifest.json'}")
    params_digest = ctx.params.digest(ctx.sections)
    digest = hashlib.sha256(f"{params_digest}:{manifest['tokenizer_sha256']}".encode()).hexdigest()[:16]
    val = load_tokens(ctx.args.tokens, "val")[1:] if ctx.params.train_generator.val_images else None
    trainer = Trainer(model_cfg, ctx.params.train_generator, ids, labels, dist, seed=ctx.params.run.seed,
                      checkpointer=Checkpointer(ctx.args.checkpoints, digest), log=ctx.log,
                      log_metrics=ctx.tracker.log_metrics, val=val)
    try:
        fit = trainer.fit()
        metrics = {**fit, "parameters": sum(p.numel() for p in trainer.model.parameters()),
                   "world_size": trainer.dist.world_size, "peak_lr": trainer.cfg.peak_lr,
                   "train_loss": round(trainer.history.rows[-1]["loss"], 5),
                   "train_accuracy": round(trainer.history.rows[-1]["accuracy"], 5)}
        utilisation = mfu(flops_per_image(trainer.model), fit["images_per_second"], peak_flops(trainer.device),
                          trainer.dist.world_size)
        metrics["mfu"] = None if utilisation is None else round(utilisation, 4)
        if val is not None:
            metrics |= evaluate(trainer.model, *val, trainer.cfg.val_images, trainer.device, trainer.cfg.bf16)
        if trainer.dist.is_main:
            _write_outputs(ctx, trainer, manifest, metrics)
            trainer.checkpointer.clear()  # only now that every output is written
            ctx.log.info("generator: train loss %s acc %s, val loss %s acc %s, %.0f tokens/s",
                         metrics["train_loss"], metrics["train_accuracy"], metrics.get("val_loss"),
                         metrics.get("val_accuracy"), metrics["tokens_per_second"])
        return metrics
    finally:
        cleanup()
