"""A/B: sampling-step attention as q @ K^T (current) vs K @ q^T (keys times the query column), alternating."""
import dataclasses, math, sys, time
import torch
import torch.nn.functional as F
import spectralar.models.generator as G
from spectralar.bench import _model_configs, SAMPLING_SIZES
from spectralar.models.generator import SpectralGPT
from spectralar.models.sampling import cyclic_labels, generate

original = G.SelfAttention.forward

def variant(self, x_BLC, attn_mask, is_causal, cache):
    B, L, C = x_BLC.shape
    bias = torch.cat((self.query_bias, torch.zeros_like(self.query_bias), self.value_bias))
    qkv = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = self.log_scale.clamp_max(G._MAX_LOG_ATTENTION_SCALE).exp()
    q = F.normalize(q, dim=-1) * scale
    k = F.normalize(k, dim=-1)
    if cache is not None:
        k, v = cache.append(k, v)
    if cache is not None and attn_mask is None and not is_causal and x_BLC.device.type == "cpu":
        scores_BHKL = torch.matmul(k, q.transpose(-2, -1))  # (B, H, T, L)
        weights_BHKL = scores_BHKL.softmax(dim=-2)
        out = torch.matmul(weights_BHKL.transpose(-2, -1), v)  # (B, H, L, D)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
    return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(B, L, C)))

cfg0 = _model_configs("params.yaml")[1]
for size, (over, batch) in SAMPLING_SIZES.items():
    cfg = dataclasses.replace(cfg0, **over)
    torch.manual_seed(0)
    model = SpectralGPT(cfg).eval()
    labels = cyclic_labels(cfg.num_classes, -(-batch // cfg.num_classes))[:batch]
    rows = torch.cat((labels, torch.full_like(labels, model.null_class)))
    ids = torch.randint(0, cfg.vocab_size, (rows.shape[0], cfg.num_tokens - 1), generator=torch.Generator().manual_seed(0))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        def run(fn):
            G.SelfAttention.forward = fn
            t = time.perf_counter()
            out = generate(model, labels, cfg_scale=1.5, generator=torch.Generator().manual_seed(0), use_kv_cache=True)
            return time.perf_counter() - t, out
        def floor():
            t = time.perf_counter()
            with torch.no_grad():
                model.logits_from_prefix(model.class_condition(rows), ids)
            return time.perf_counter() - t
        best = {"qK": math.inf, "Kq": math.inf, "floor": math.inf}
        run(original); run(variant); floor()
        same = True
        for r in range(4):
            a, ta = run(original); b, tb = run(variant); f = floor()
            same &= torch.equal(ta, tb)
            best["qK"] = min(best["qK"], a); best["Kq"] = min(best["Kq"], b); best["floor"] = min(best["floor"], f)
        print(size, threads, "thr", {k: round(v, 4) for k, v in best.items()},
              "cache/floor qK %.3f Kq %.3f" % (best["floor"] / best["qK"], best["floor"] / best["Kq"]), "tokens identical:", same, flush=True)
G.SelfAttention.forward = original
