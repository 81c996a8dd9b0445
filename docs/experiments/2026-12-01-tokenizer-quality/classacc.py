"""Domain classifier (train_evalnet's recipe) -> class accuracy and domain rFID of a scratch/exp.py model."""
import sys, argparse, types, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "/tmp/quality/scratch")
from exp import Model
from spectralar.data.fashion_mnist import load_split
from spectralar.evaluation.domain import train_domain_net, predict
from spectralar.evaluation.metrics import _fid, _fid_statistics
from spectralar.models.tokenizer import TokenizerConfig
from spectralar.spectral import band_limit, frequency_schedule
D = "/usr/share/datasets/fashion-mnist"
tr, trl = load_split(D, "train", 32); va, val = load_split(D, "val", 32)
t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
net, acc = train_domain_net(t(tr), torch.from_numpy(trl), val_images=t(va), val_labels=torch.from_numpy(val), seed=0)
print("domain net val accuracy", acc, flush=True)
idx = np.linspace(0, len(va) - 1, 1000).round().astype(int)
x_u8 = t(va[idx]); labels = torch.from_numpy(val[idx])
for path in sys.argv[1:]:
    ck = torch.load(path, weights_only=False); a = types.SimpleNamespace(**ck["args"])
    cfg = TokenizerConfig(image_size=32, in_channels=1, patch_size=a.patch, width=a.width, encoder_depth=a.enc_depth,
                          decoder_depth=a.dec_depth, heads=a.heads, mlp_ratio=a.mlp_ratio, num_tokens=a.tokens,
                          codebook_size=a.codebook, code_dim=a.code_dim, commitment_weight=a.commit,
                          proxy_codebook_size=256, causal_mask=bool(a.causal))
    m = Model(cfg, a); m.load_state_dict(ck["model"]); m.eval()
    with torch.no_grad():
        x = x_u8.float().div(127.5).sub(1)
        zq, ids, _ = m.quantize(m.tok.encoder(x))
        rec = m.decode(zq, None).clamp(-1, 1)
    rec_u8 = rec.add(1).mul(127.5).round().to(torch.uint8)
    f_real, l_real = predict(net, x_u8); f_fake, l_fake = predict(net, rec_u8)
    rfid = _fid(f_fake, _fid_statistics(f_real))
    print(path, "orig acc", (l_real.argmax(1) == labels).float().mean().item(),
          "recon acc", (l_fake.argmax(1) == labels).float().mean().item(), "rFID", round(rfid, 2), flush=True)
