"""One default tokenizer training step (batch 32, random images, L2 to the input) in float32 and under CPU bf16
autocast, each with SDPA restricted to the fused flash kernel or to math; 3 rounds of 15 timed steps.
Run from the repository root: python docs/experiments/2026-12-02-cpu-bf16/tokenizer_step.py 2"""
import time, torch, sys, contextlib
from torch.nn.attention import SDPBackend, sdpa_kernel
from spectralar.models.tokenizer import TokenizerConfig, NestedSpectralTokenizer
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[1]))
cfg = TokenizerConfig(image_size=32, in_channels=1, patch_size=4, width=128, encoder_depth=3, decoder_depth=3,
                      heads=4, num_tokens=16, codebook_size=256, code_dim=12, decoder_head="pixels",
                      position_init="sincos", band_limited_output=True)
m = NestedSpectralTokenizer(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randn(32, 1, 32, 32)
def step(bf16, backend):
    pl = torch.randint(1, 17, (32,))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx, sdpa_kernel([backend]):
        out, ids, vq = m(x, pl)
        loss = (out.float() - x).pow(2).mean() + vq
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
modes = [(b, k) for b in (False, True) for k in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
res = {m_: [] for m_ in modes}
for rnd in range(3):
    for mode in modes:
        for _ in range(3): step(*mode)
        t = time.perf_counter()
        for _ in range(15): step(*mode)
        res[mode].append((time.perf_counter()-t)/15*1000)
for mode, v in res.items():
    print("bf16" if mode[0] else "fp32", mode[1].name, [round(a,1) for a in v], "ms/step")
