"""One default generator training step (batch 128, random tokens) in float32 and under CPU bf16 autocast, with
SDPA restricted to the fused flash kernel or to math; 3 rounds of 8 timed steps. Run from the repository root."""
import time, torch, sys, contextlib
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from spectralar.bench import _model_configs
from spectralar.models.generator import SpectralGPT
from spectralar.stages.train_generator import TeacherForced
from spectralar.training import build_adamw
torch.manual_seed(0); torch.set_num_threads(2)
cfg = _model_configs("params.yaml")[1]
model = SpectralGPT(cfg).train(); net = TeacherForced(model)
opt = build_adamw(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
ids = torch.randint(0, cfg.vocab_size, (128, cfg.num_tokens)); labels = torch.randint(0, cfg.num_classes + 1, (128,))
def step(bf16, math):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx, sdpa_kernel([SDPBackend.MATH if math else SDPBackend.FLASH_ATTENTION]):  # the model's choice narrowed
        logits = net(ids, labels)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
modes = [(b, m) for b in (False, True) for m in (False, True)]
res = {m: [] for m in modes}
for rnd in range(3):
    for mode in modes:
        for _ in range(2): step(*mode)
        t = time.perf_counter()
        for _ in range(8): step(*mode)
        res[mode].append((time.perf_counter()-t)/8*1000)
for mode, v in res.items():
    print("bf16" if mode[0] else "fp32", "math" if mode[1] else "flash", [round(a,1) for a in v], "ms/step")
