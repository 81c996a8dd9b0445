"""Steady-state ms/step and compile time of the real stage-1 tokenizer Trainer (default params, float32),
torch.compile on or off. Run from a project root holding data/prepared and models/proxy:
python compile_bench.py STEPS on|off"""
import sys, time, dataclasses, torch
from spectralar.config import load_params
from spectralar.data.shards import ImageShards
from spectralar.artifacts import load_proxy, tokenizer_config_for
from spectralar.stages.train_tokenizer import Trainer
steps, mode = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(2)
p = load_params(sys.argv[3] if len(sys.argv) > 3 else "params.yaml")
cfg = dataclasses.replace(p.train_tokenizer, stage1_steps=steps, checkpoint_every=10**9, log_every=10**9,
                          cpu_bf16=False, warmup_steps=10, compile=(mode == "on"))
train = ImageShards("data/prepared", "train")
proxy = load_proxy("models/proxy/proxy.pt", torch.device("cpu"))
tok_cfg = tokenizer_config_for(p.tokenizer, train.image_shape, proxy.config.codebook_size)
tr = Trainer(tok_cfg, cfg, train, proxy, "data/proxy_codes", torch.device("cpu"), seed=0)
stamps = []
inner = tr._stage1
def timed(*a, **k):
    out = inner(*a, **k); stamps.append(time.perf_counter()); return out
tr._stage1 = timed
t0 = time.perf_counter(); fit = tr.fit()
d = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
steady = sorted(d[20:])[len(d[20:]) // 2]
print(f"compile={mode} first-step {d[0]:.1f} s, steps 2-20 {sum(d[1:20]):.1f} s, median of steps 21+ {steady*1000:.0f} ms,"
      f" mean of steps 21+ {sum(d[20:])/len(d[20:])*1000:.0f} ms, total {time.perf_counter()-t0:.1f} s")
