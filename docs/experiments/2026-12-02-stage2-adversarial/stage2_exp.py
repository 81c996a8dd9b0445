"""Stage-2 decoder fine-tuning (L2 [+ adversarial]) on top of the committed stage-1 tokenizer: does an
adversarial term raise the reconstructions' recall (and lower rFID) at what PSNR cost? Run from the
root of a project after `make repro`: python stage2_exp.py NAME STEPS ADVERSARIAL_WEIGHT STAGE2_LR."""
import dataclasses, json, sys, time
import torch
from spectralar.config import load_params
from spectralar.artifacts import load_codec, load_proxy
from spectralar.data.shards import ImageShards
from spectralar.stages.train_tokenizer import Trainer, tokenizer_config_for
from spectralar.models.codec import SpectralCodec
from spectralar.evaluation.reconstruction import prefix_psnr
from spectralar.stages.evaluate import EvaluateConfig, Scorer, realism_calibration, reference_for, reconstruction_metrics

torch.set_num_threads(2)
name, steps, adv, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
params = load_params("params.yaml")
device = torch.device("cpu")
train, val = ImageShards("data/prepared", "train"), ImageShards("data/prepared", "val")
proxy = load_proxy("models/proxy/proxy.pt", device)
tok_cfg = tokenizer_config_for(params.tokenizer, train.image_shape, proxy.config.codebook_size)
cfg = dataclasses.replace(params.train_tokenizer, stage1_steps=0, stage2_steps=steps, adversarial_weight=adv,
                          stage2_lr=lr, stage2_warmup_steps=min(20, steps), warmup_steps=0)
trainer = Trainer(tok_cfg, cfg, train, proxy, "data/proxy_codes", device, seed=0)
trainer.tokenizer.load_state_dict(load_codec("models/tokenizer/tokenizer.pt", device).tokenizer.state_dict())
t0 = time.perf_counter()
if steps:
    trainer.fit()
train_s = time.perf_counter() - t0
codec = SpectralCodec(trainer.tokenizer, proxy, trainer.omegas, soft=steps > 0).eval()
ecfg = EvaluateConfig()
scorer = Scorer(ecfg, "models/evalnet/evalnet.pt", device)
reference = reference_for("data/reference", "domain")
rec = reconstruction_metrics(scorer, codec, val, 1000, 250)
real = realism_calibration(scorer, codec, train, 1000, reference)["realism"]
out = {"name": name, "steps": steps, "adversarial_weight": adv, "stage2_lr": lr, "train_seconds": round(train_s, 1),
       "psnr_full": rec["psnr_full"], "psnr_prefix": rec["psnr_prefix"], "rfid": rec["rfid"],
       "reconstruction_class_accuracy": rec["reconstruction_class_accuracy"], "realism": real}
print(json.dumps(out))
with open(f"{name}.json", "w") as f:
    json.dump(out, f, indent=1)
