"""The PCA code at more bits than the tokenizer's 128: PSNR, rFID, class accuracy (1,000 spread val images)
and FID / precision / recall / class accuracy of 1,000 spread train images against the 10,000 val references
(the evaluate stage's calibration protocol). Basis fitted on 10,000 spread train images."""
import json, sys, torch
torch.set_num_threads(1)
from spectralar.data.shards import ImageShards
from spectralar.data.loader import to_float, to_uint8
from spectralar.evaluation.quality import float_images
from spectralar.evaluation.baselines import fit_pca, pca_reconstruct
from spectralar.evaluation.measures import psnr
from spectralar.evaluation.domain import class_accuracy
from spectralar.stages.evaluate import EvaluateConfig, Scorer, reference_for
from spectralar.evaluation.metrics import compute_metrics, reference_statistics
root = sys.argv[1]
train, val = ImageShards(f"{root}/data/prepared", "train"), ImageShards(f"{root}/data/prepared", "val")
basis = fit_pca(float_images(train, train.spread(10000)), 128)
sc = Scorer(EvaluateConfig(feature_extractor="domain"), f"{root}/models/evalnet/evalnet.pt", torch.device("cpu"))
def load(shards, n):
    i = shards.spread(n)
    return torch.from_numpy(shards.images(i)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(shards.labels[i])
vimg, vlab = load(val, 1000); timg, tlab = load(train, 1000)
pimg = float_images(val, val.spread(250))
stats = reference_statistics(sc.embed(vimg)["features"]); ref = reference_for(f"{root}/data/reference", "domain")
rows = []
for k, bits in ((16, 8), (24, 8), (32, 8), (48, 8), (64, 8), (64, None), (128, None)):
    code = lambda x: to_uint8(pca_reconstruct(basis, to_float(x), k, bits).float())
    f = sc.embed(code(vimg)); tf = sc.embed(code(timg))
    s = compute_metrics(tf, ref, fid=True, isc=False, kid=False, prc=True, prc_neighborhood=3)
    row = {"components": k, "bits_per_coefficient": bits, "bits": k * bits if bits else None,
           "psnr_250_val": round(float(psnr(pca_reconstruct(basis, pimg, k, bits), pimg).mean()), 2),
           "rfid": round(compute_metrics(f, stats, fid=True, isc=False, kid=False, prc=False)["fid"], 1),
           "val_class_accuracy": class_accuracy(f["class_logits"], vlab),
           "fid": round(s["fid"], 1), "precision": round(s["precision"], 3), "recall": round(s["recall"], 3),
           "train_class_accuracy": class_accuracy(tf["class_logits"], tlab)}
    rows.append(row); print(json.dumps(row), flush=True)
