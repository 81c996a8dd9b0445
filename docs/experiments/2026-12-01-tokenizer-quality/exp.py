"""Scratch trainer for ranking tokenizer-quality levers (stage 1 with a pixel head, optional stage 2).

Usage: python scratch/exp.py --name NAME [--steps 500 --lr 3e-3 ...]; appends a JSON line to
scratch/results.jsonl and prints the per-prefix table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from spectralar.data.fashion_mnist import load_split  # noqa: E402
from spectralar.evaluation.baselines import dct_ceiling_psnr, fit_pca, pca_equal_bits_psnr, psnr_per_image  # noqa
from spectralar.models.quantizer import codebook_stats  # noqa: E402
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig  # noqa: E402
from spectralar.spectral import band_limit, frequency_schedule  # noqa: E402
from spectralar.training import EMA, DeadCodeRestarts, build_adamw, lr_at, set_lr  # noqa: E402

ROOT = Path(__file__).resolve().parent
DATA = "/usr/share/datasets/fashion-mnist"


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos table (grid*grid, width)."""
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = []
    for pos in (ys.flatten(), xs.flatten()):
        angle = pos[:, None] * omega[None]
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, 1).float()


class PixelHead(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.in_channels)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_BPC: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        g, p, c = cfg.grid_size, cfg.patch_size, cfg.in_channels
        x = self.linear(hidden_BPC)  # (B, P, p*p*c)
        x = x.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, c, g * p, g * p)


class Model(nn.Module):
    def __init__(self, cfg: TokenizerConfig, args):
        super().__init__()
        self.tok = NestedSpectralTokenizer(cfg)
        self.head = PixelHead(cfg)
        self.args = args
        if args.pos == "sincos":
            with torch.no_grad():
                table = sincos_2d(cfg.grid_size, cfg.width)[None] * args.pos_scale
                self.tok.encoder.patch_position_embedding.copy_(table)
                self.tok.decoder.mask_position_embedding.copy_(table)
        if args.quant == "raw":
            self.tok.quantizer.normalize = False
        if args.codebook_init == "normal":
            with torch.no_grad():
                self.tok.quantizer.embedding.weight.normal_()

    def quantize(self, z):
        if self.args.quant == "none":
            return z, torch.zeros(z.shape[:2], dtype=torch.long), z.new_zeros(())
        return self.tok.quantizer(z)

    def forward(self, x, prefix):
        z = self.tok.encoder(x)
        zq, ids, vq = self.quantize(z)
        return self.decode(zq, prefix), ids, vq, z

    def decode(self, zq, prefix):
        h = self.tok.decoder.hidden_states(zq, prefix)
        h = self.tok.decoder.norm_post(h[:, :self.tok.config.num_patches])
        return self.head(h)


def sample_levels(batch, n, kind, gen):
    if kind == "uniform":
        return torch.randint(0, n, (batch,), generator=gen)
    if kind == "linear":  # p(i) ∝ i
        p = torch.arange(1, n + 1, dtype=torch.float)
        return torch.multinomial(p / p.sum(), batch, replacement=True, generator=gen)
    if kind == "sqrt":
        p = torch.arange(1, n + 1, dtype=torch.float).sqrt()
        return torch.multinomial(p / p.sum(), batch, replacement=True, generator=gen)
    if kind.startswith("full"):  # fullF: fraction F of samples use all N tokens, rest uniform
        frac = float(kind[4:] or 0.25)
        lv = torch.randint(0, n, (batch,), generator=gen)
        full = torch.rand(batch, generator=gen) < frac
        return torch.where(full, torch.full_like(lv, n - 1), lv)
    raise ValueError(kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--final_lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--enc_depth", type=int, default=3)
    ap.add_argument("--dec_depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp_ratio", type=float, default=4.0)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--code_dim", type=int, default=12)
    ap.add_argument("--commit", type=float, default=0.25)
    ap.add_argument("--quant", default="l2", choices=["l2", "raw", "none"])
    ap.add_argument("--codebook_init", default="titok", choices=["titok", "normal"])
    ap.add_argument("--restart", type=int, default=0)
    ap.add_argument("--pos", default="trunc", choices=["trunc", "sincos"])
    ap.add_argument("--pos_scale", type=float, default=1.0)
    ap.add_argument("--levels", default="uniform")
    ap.add_argument("--k", type=int, default=1, help="prefixes per sample (decoder batch x k)")
    ap.add_argument("--loss", default="l2", choices=["l2", "l1"])
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--schedule", default="nonuniform")
    ap.add_argument("--eval_images", type=int, default=500)
    ap.add_argument("--eval_every", type=int, default=0)
    ap.add_argument("--save", default="")
    ap.add_argument("--project", type=int, default=0, help="band-limit the decoder output of prefix i to ω_i")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    cfg = TokenizerConfig(image_size=32, in_channels=1, patch_size=args.patch, width=args.width,
                          encoder_depth=args.enc_depth, decoder_depth=args.dec_depth, heads=args.heads,
                          mlp_ratio=args.mlp_ratio, num_tokens=args.tokens, codebook_size=args.codebook,
                          code_dim=args.code_dim, commitment_weight=args.commit, proxy_codebook_size=256,
                          causal_mask=bool(args.causal))
    n = cfg.num_tokens
    omegas = frequency_schedule(n, 32, args.schedule)
    train_u8, _ = load_split(DATA, "train", 32)
    val_u8, _ = load_split(DATA, "val", 32)
    train = torch.from_numpy(train_u8).permute(0, 3, 1, 2).contiguous()
    val_idx = np.linspace(0, len(val_u8) - 1, args.eval_images).round().astype(int)
    val = torch.from_numpy(val_u8[val_idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    model = Model(cfg, args)
    opt = build_adamw(model, lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.wd)
    ema = EMA(model, args.ema, warmup=True)
    restarts = DeadCodeRestarts(args.codebook, args.restart, seed=args.seed)
    omega_t = torch.tensor(omegas)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    log = []
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        x = train[idx].float().div(127.5).sub(1)
        levels = torch.cat([sample_levels(args.batch, n, args.levels, gen) for _ in range(args.k)])
        z = model.tok.encoder(x)
        zq, ids, vq = model.quantize(z)
        if args.k > 1:
            zq = zq.repeat(args.k, 1, 1)
            xt = x.repeat(args.k, 1, 1, 1)
        else:
            xt = x
        rec = model.decode(zq, levels + 1)
        if args.project:
            rec = band_limit(rec, omega_t[levels])
        target = band_limit(xt, omega_t[levels])
        rl = F.mse_loss(rec, target) if args.loss == "l2" else F.l1_loss(rec, target)
        loss = rl + vq
        lr = lr_at(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps, schedule="cosine",
                   final_lr=args.final_lr)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        ema.update(model)
        if args.quant != "none":
            restarts.observe(ids)
            if restarts.due(step) and step + 1 < args.steps:
                with torch.no_grad():
                    lat = model.tok.encoder(x).reshape(-1, cfg.code_dim)
                shadow = ema.shadow["tok.quantizer.embedding.weight"]
                restarts.restart(step, model.tok.quantizer.embedding.weight, lat, optimizer=opt, ema_shadow=shadow,
                                 normalized=model.tok.quantizer.normalize)
        if (step + 1) % 100 == 0:
            el = time.perf_counter() - t0
            print(f"step {step+1} loss {rl.detach().item():.4f} vq {float(vq):.4f} lr {lr:.2e} {el/(step+1):.3f}s/step",
                  flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            t_eval = time.perf_counter()
            r = evaluate(model, ema, val, omegas, args, quick=True)
            print(f"  eval@{step+1}: full {r['vs_image'][-1]:.2f} prefix1 {r['vs_target'][0]:.2f}", flush=True)
            log.append({"step": step + 1, "full": r["vs_image"][-1]})
            t0 += time.perf_counter() - t_eval
    sec_per_step = (time.perf_counter() - t0) / args.steps
    result = evaluate(model, ema, val, omegas, args)
    result.update(name=args.name, args=vars(args), sec_per_step=round(sec_per_step, 4), curve=log)
    with open(ROOT / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")
    show(result, omegas)
    if args.save:
        ema.copy_to(model)
        torch.save({"model": model.state_dict(), "args": vars(args)}, args.save)


@torch.no_grad()
def evaluate(model, ema, val, omegas, args, quick=False):
    import copy
    m = copy.deepcopy(model)
    ema.copy_to(m)
    m.eval()
    n = len(omegas)
    vs_t, vs_i, all_ids = torch.zeros(n), torch.zeros(n), []
    prefixes = [n] if quick else range(1, n + 1)
    for s in range(0, len(val), 250):
        x = val[s:s + 250]
        z = m.tok.encoder(x)
        zq, ids, _ = m.quantize(z)
        all_ids.append(ids)
        for i in prefixes:
            rec = m.decode(zq[:, :i], None)
            if args.project:
                rec = band_limit(rec, omegas[i - 1])
            rec = rec.clamp(-1, 1)
            vs_t[i - 1] += psnr_per_image(rec, band_limit(x, omegas[i - 1])).sum()
            vs_i[i - 1] += psnr_per_image(rec, x).sum()
    vs_t, vs_i = vs_t / len(val), vs_i / len(val)
    out = {"vs_target": [round(v, 2) for v in vs_t.tolist()], "vs_image": [round(v, 2) for v in vs_i.tolist()]}
    if args.quant != "none":
        ids = torch.cat(all_ids)
        st = codebook_stats(ids, args.codebook)
        per_tok = []
        for j in range(n):
            c = torch.bincount(ids[:, j], minlength=args.codebook).double()
            p = c[c > 0] / c.sum()
            per_tok.append(round(float(-(p * p.log2()).sum()), 2))
        c = torch.bincount(ids.flatten(), minlength=args.codebook).double()
        p = c[c > 0] / c.sum()
        out.update(usage=round(st["usage"], 3), perplexity=round(st["perplexity"], 1),
                   token_entropy_bits=per_tok, sum_token_entropy=round(sum(per_tok), 1))
    return out


def show(r, omegas):
    print(f"== {r['name']}  {r['sec_per_step']} s/step  usage {r.get('usage')} ppl {r.get('perplexity')} "
          f"sum-token-entropy {r.get('sum_token_entropy')}")
    for i in (1, 2, 4, 8, 12, 16):
        if i <= len(omegas):
            print(f"  i={i:2d} w={omegas[i-1]:2d}  vs I'_i {r['vs_target'][i-1]:6.2f}  vs I {r['vs_image'][i-1]:6.2f}")


if __name__ == "__main__":
    main()
