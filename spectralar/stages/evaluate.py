"""evaluate: sample quality, reconstruction quality and truncated generation (paper §4, Tables 2-3).

1. Generation (Table 2): ``samples/samples.npz`` is embedded with ``evaluate.feature_extractor`` and
   scored against ``data/reference/<extractor>.npz`` (reference_stats): FID, IS, KID, precision and
   recall through torch-fidelity's own functions (``spectralar.evaluation.metrics``), plus the class
   accuracy of the conditional samples under the domain classifier (the class each was asked for).
2. Reconstruction (Table 2's rFID, ADM/TiTok convention): the tokenizer encodes ``reconstruction_images``
   val images (spread evenly over the split: ImageFolder splits are class-sorted) and decodes all N tokens; rFID compares the reconstructions
   with the statistics of those same images (not the reference_stats file), and the class accuracy of
   the reconstructions is the ceiling for the samples' class accuracy. PSNR of every prefix against
   its band-limited target I'_i and against the full image (train_tokenizer's ``evaluate``) on
   ``psnr_images`` spread val images: N decodes per image, ~30-50 s for 1000 images on 2 CPU cores.
3. Truncation (Table 3): FID of ``samples/truncated/samples_drop{k}.npz`` (the same samples decoded
   from their first N-k tokens), for every such file; k = 0 is ``samples.npz``.

The paper's numbers sit beside ours under ``paper``: they are ImageNet 256x256 with Inception
features, 64 tokens and 50k samples, so they show the protocol, not a target for Fashion-MNIST.
Outputs under ``--out`` (one directory, atomic): ``generation.csv``, ``truncation.csv``,
``reconstruction.csv``, ``config.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from spectralar.artifacts import SAMPLES_FILE, load_codec, load_samples, truncated_files
from spectralar.config import require
from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.evaluation.domain import class_accuracy
from spectralar.evaluation.headline import HEADLINE_METRICS
from spectralar.evaluation.quality import PCA_BITS, EqualBitsPCA, equal_bits_pca, float_images, proxy_ceiling, \
    reference_codes
from spectralar.evaluation.quality_table import quality_rows, quality_summary
from spectralar.evaluation.reconstruction import prefix_psnr
from spectralar.io import atomic_path, csv_text
from spectralar.models.codec import SpectralCodec, decode_uint8
from spectralar.stages.common import stage_device

# spectralar.evaluation.metrics and .extractors are imported inside the functions that score: they pull in
# torch-fidelity, torchvision and torch._dynamo (2 s), which every stage would otherwise pay, since
# load_params imports this module for EvaluateConfig (tests/test_orchestration.py lists them as lazy deps)


# SpectralAR-d16 on ImageNet 256x256 (Inception features, 50k samples, N = 64 tokens).
PAPER = {
    "note": "paper, ImageNet 256x256, SpectralAR-d16, 64 tokens, Inception features, 50k samples: "
            "not comparable with Fashion-MNIST numbers",
    "fid": 3.02, "inception_score": 282.2, "precision": 0.81, "recall": 0.55, "rfid": 4.03,  # Table 2
    "num_tokens": 64,
    "fid_truncated": {"0": 3.02, "5": 3.34, "10": 6.65, "15": 27.69},  # Table 3: last k of 64 tokens dropped
}


@dataclass(frozen=True)
class EvaluateConfig:
    feature_extractor: Literal["domain", "inception"] = "domain"  # its reference_stats npz must exist
    inception_weights: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth ("" = look up)
    batch_size: int = 250  # feature extraction and decoding
    reconstruction_images: int = 1000  # val images (spread over the split) for rFID and class accuracy
    psnr_images: int = 250  # val images (spread) for the per-prefix PSNR table (N decodes per image)
    baseline_images: int = 10000  # training images the equal-bits PCA code is fitted on; 0 = no PCA/DCT columns
    kid_subset_size: int = 1000  # torch-fidelity's default (clamped to the number of samples)
    kid_subsets: int = 100
    isc_splits: int = 10
    prc_neighborhood: int = 3  # k of the k-NN manifolds (Kynkäänniemi et al. 2019)

    def __post_init__(self) -> None:
        require(self, "batch_size", "psnr_images", "kid_subsets", "isc_splits", "prc_neighborhood", at_least=1)
        require(self, "reconstruction_images", "kid_subset_size", at_least=2, meaning="FID and KID need 2 images")
        require(self, "baseline_images", at_least=0, meaning="0 = no PCA/DCT baseline columns")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", default="samples", help="sample stage output (samples.npz, truncated/)")
    parser.add_argument("--reference", default="data/reference", help="reference_stats output (<extractor>.npz)")
    parser.add_argument("--evalnet", default="models/evalnet/evalnet.pt", help="train_evalnet model")
    parser.add_argument("--tokenizer", default="models/tokenizer/tokenizer.pt", help="trained tokenizer file")
    parser.add_argument("--data", default="data/prepared", help="prepared dataset (val images)")
    parser.add_argument("--out", default="reports/evaluate", help="output directory (tables)")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def reference_for(directory: str | Path, name: str) -> dict[str, Any]:
    path = Path(directory) / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate.feature_extractor is {name!r}; add it to "
                                f"reference_stats.extractors and run the reference_stats stage")
    from spectralar.evaluation.metrics import load_reference

    return load_reference(path)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------

class Scorer:
    """Embeds images with the configured extractor (and the domain net for class accuracy) and scores them."""

    def __init__(self, cfg: EvaluateConfig, evalnet: str, device: torch.device) -> None:
        from spectralar.evaluation.extractors import extractor_for

        self.cfg, self.device = cfg, device
        self.extractor, self.kwargs = extractor_for(cfg.feature_extractor, cfg.inception_weights, evalnet)
        self.domain_kwargs = extractor_for("domain", cfg.inception_weights, evalnet)[1]
        self.images_embedded, self.embedding_seconds = 0, 0.0  # the configured extractor's throughput

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"features", ["logits"], "class_logits"} of uint8 images (N, C, H, W)."""
        from spectralar.evaluation.metrics import extract_features

        begin = time.perf_counter()
        embedded = extract_features(images, self.extractor, self.kwargs, self.cfg.batch_size, self.device)
        self.embedding_seconds += time.perf_counter() - begin  # features come back on the host: device work done
        self.images_embedded += len(images)
        if self.cfg.feature_extractor == "domain":
            embedded["class_logits"] = embedded["logits"]
        else:
            embedded["class_logits"] = extract_features(images, "domain", self.domain_kwargs, self.cfg.batch_size,
                                                        self.device)["logits"]
        return embedded

    def score(self, embedded: dict, labels: torch.Tensor, reference: dict, *, full: bool = True) -> dict[str, Any]:
        """FID and IS (+ KID, precision, recall when ``full``) and the class accuracy of the samples."""
        from spectralar.evaluation.metrics import compute_metrics

        cfg = self.cfg
        metrics = compute_metrics(embedded, reference, fid=True, isc=True, kid=full, prc=full,
                                  kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets,
                                  isc_splits=cfg.isc_splits, prc_neighborhood=cfg.prc_neighborhood,
                                  device=self.device)
        metrics["class_accuracy"] = class_accuracy(embedded["class_logits"], labels)
        return metrics


def generation_metrics(scorer: Scorer, samples_dir: Path, reference: dict, image_shape, num_classes: int,
                       num_tokens: int) -> tuple[dict, dict[int, dict]]:
    """Table 2 metrics of samples.npz and Table 3 rows {k: {fid, inception_score, class_accuracy, ...}}."""
    images, labels, ids = load_samples(samples_dir / SAMPLES_FILE, image_shape, num_classes)
    if ids is not None and (ids.ndim != 2 or ids.shape != (len(images), num_tokens)):
        raise ValueError(f"{samples_dir / 'samples.npz'}: ids have shape {ids.shape}, expected "
                         f"({len(images)}, {num_tokens}) for the tokenizer's N = {num_tokens}")
    generation = scorer.score(scorer.embed(images), labels, reference)
    rows = {0: generation}
    for k, path in truncated_files(samples_dir).items():
        if not 0 < k < num_tokens:
            raise ValueError(f"{path}: {k} dropped tokens is not in 1..{num_tokens - 1} (N = {num_tokens})")
        images, labels, _ = load_samples(path, image_shape, num_classes)
        rows[k] = scorer.score(scorer.embed(images), labels, reference, full=False)
    return generation, rows


@torch.no_grad()
def reconstruct(codec: SpectralCodec, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The tokenizer's reconstructions from all N tokens, uint8 (B, C, H, W) like the input."""
    device = next(codec.parameters()).device
    ids = torch.cat([codec.encode(to_float(images[start:start + batch_size].to(device)))
                     for start in range(0, len(images), batch_size)])  # (B, N)
    return torch.from_numpy(decode_uint8(codec, ids, batch_size)).permute(0, 3, 1, 2).contiguous()


def reconstruction_metrics(scorer: Scorer, codec: SpectralCodec, val: ImageShards, count: int,
                           psnr_count: int, pca: EqualBitsPCA | None = None) -> dict[str, Any]:
    """rFID against the same val images, class accuracy of originals and reconstructions (``count`` val
    images spread over the split), PSNR of every prefix (``psnr_count`` spread images: N decodes each)
    beside the DCT ceiling, the equal-bits PCA code (``pca``; None = no simple codes) and the proxy's
    ceiling (``spectralar.evaluation.quality``), on the same images; with ``pca``, the rFID and class
    accuracy of the PCA code of the full code's bits on the same ``count`` images (``pca_equal_bits_code``)."""
    from spectralar.evaluation.metrics import compute_metrics, reference_statistics

    index = val.spread(count)  # evenly over the split (ImageFolder splits are class-sorted)
    count = len(index)
    images = torch.from_numpy(val.images(index)).permute(0, 3, 1, 2).contiguous()  # (R, C, H, W)
    labels = torch.from_numpy(val.labels[index])
    real = scorer.embed(images)
    real_statistics = reference_statistics(real["features"])

    def rfid(embedded: dict) -> float:
        return compute_metrics(embedded, real_statistics, fid=True, isc=False, kid=False, prc=False)["fid"]

    fake = scorer.embed(reconstruct(codec, images, scorer.cfg.batch_size))
    psnr = prefix_psnr(codec, val, min(psnr_count, count), scorer.device)
    psnr_images = float_images(val, val.spread(psnr["eval_images"]))
    baselines: dict[str, Any] = {"proxy_ceiling": proxy_ceiling(codec.proxy, psnr_images, codec.omegas)}
    if pca is not None:
        baselines |= reference_codes(pca, psnr_images, codec.omegas)
        simple = scorer.embed(pca.images(images))
        baselines["pca_equal_bits_code"] = {"components": pca.components[-1], "bits": PCA_BITS, "rfid": rfid(simple),
                                            "class_accuracy": class_accuracy(simple["class_logits"], labels)}
    return {
        "rfid": rfid(fake),
        "rfid_num_images": count,
        "reconstruction_class_accuracy": class_accuracy(fake["class_logits"], labels),
        "val_class_accuracy": class_accuracy(real["class_logits"], labels),  # the domain net on the originals
        "psnr_prefix": psnr["psnr_prefix"],
        "psnr_prefix_vs_full_image": psnr["psnr_prefix_vs_full_image"],
        "psnr_full": psnr["psnr_full"],
        **baselines,
        "codebook_usage": psnr["codebook_usage"],
        "codebook_perplexity": psnr["codebook_perplexity"],
        "reconstruction_images": count,
        "psnr_images": psnr["eval_images"],
        "omegas": list(codec.omegas),
    }


def realism_calibration(scorer: Scorer, codec: SpectralCodec, train: ImageShards, count: int,
                        reference: dict, pca: EqualBitsPCA | None = None) -> dict[str, Any]:
    """FID, precision and recall of ``count`` real train images and of the tokenizer's reconstructions of
    them, scored exactly as the samples are (same count, same val reference, same k): what real data
    scores under this protocol (FID's small-sample floor, the recall real images reach at this count) and
    what a generator that produced exactly their tokens would score, since every sample passes through the
    same decoder; with ``pca``, also the same images through the PCA code of the tokens' bits
    (``pca_equal_bits``). Train images, because the reference is the val split; empty without reference
    features (ADM's mu/sigma file)."""
    if reference.get("features") is None or count < 1:
        return {}
    from spectralar.evaluation.metrics import compute_metrics

    index = train.spread(count)
    images = torch.from_numpy(train.images(index)).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(train.labels[index])
    out: dict[str, Any] = {"images": len(index)}
    versions = {"real": lambda: images, "reconstructions": lambda: reconstruct(codec, images, scorer.cfg.batch_size)}
    if pca is not None:
        versions["pca_equal_bits"] = lambda: pca.images(images)
    for name, make in versions.items():
        embedded = scorer.embed(make())
        scored = compute_metrics(embedded, reference, fid=True, isc=False, kid=False, prc=True,
                                 prc_neighborhood=scorer.cfg.prc_neighborhood, device=scorer.device)
        out[name] = {**{key: scored[key] for key in ("fid", "precision", "recall")},
                     "class_accuracy": class_accuracy(embedded["class_logits"], labels)}
    return {"realism": out}


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _csv(rows: list[dict]) -> str:
    return csv_text([{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])


def generation_rows(metrics: dict, dataset: str) -> list[dict]:
    """Table 2: our row and the paper's d16 row."""
    keys = HEADLINE_METRICS
    ours = {"source": "ours", "dataset": dataset, "feature_extractor": metrics["feature_extractor"],
            "num_tokens": metrics["num_tokens"], "num_samples": metrics["num_samples"],
            "num_reference": metrics["num_reference"], **{k: metrics[k] for k in keys}}
    paper = {"source": "paper (SpectralAR-d16)", "dataset": "ImageNet 256x256", "feature_extractor": "inception",
             "num_tokens": PAPER["num_tokens"], "num_samples": 50000, "num_reference": None,
             **{k: PAPER.get(k) for k in keys}}
    return [ours, paper]


def truncation_rows(rows: dict[int, dict], num_tokens: int) -> list[dict]:
    """Table 3: one row per number k of dropped tokens; paper_fid for the same k (of the paper's 64)."""
    return [{"k": k, "tokens_kept": num_tokens - k, "fid": row["fid"], "inception_score": row["inception_score"],
             "class_accuracy": row["class_accuracy"], "num_samples": row["num_samples"],
             "paper_fid": PAPER["fid_truncated"].get(str(k))} for k, row in rows.items()]


def reconstruction_rows(metrics: dict, codebook_size: int) -> list[dict]:
    """The tokenizer-quality table: every prefix against its target, the image and the simple codes."""
    return [row | {"num_images": metrics["psnr_images"]} for row in quality_rows(metrics, codebook_size)]


# ------------------------------------------------------------------------------------------------
# Stage
# ------------------------------------------------------------------------------------------------

def run(ctx) -> dict:
    cfg: EvaluateConfig = ctx.params.evaluate
    device = stage_device(ctx.params.run.device)
    val, train = ImageShards(ctx.args.data, "val"), ImageShards(ctx.args.data, "train")
    reference = reference_for(ctx.args.reference, cfg.feature_extractor)
    scorer = Scorer(cfg, ctx.args.evalnet, device)
    codec = load_codec(ctx.args.tokenizer, device)
    n = codec.num_tokens
    generation, truncation = generation_metrics(scorer, Path(ctx.args.samples), reference, val.image_shape,
                                                val.num_classes, n)
    pca = (equal_bits_pca(train, n, codec.tokenizer.config.codebook_size, cfg.baseline_images)
           if cfg.baseline_images > 0 else None)
    reconstruction = reconstruction_metrics(scorer, codec, val, cfg.reconstruction_images, cfg.psnr_images, pca)
    reconstruction |= realism_calibration(scorer, codec, train, generation["num_samples"], reference, pca)
    # the quality targets' range: prefixes i <= 3N/4 (i <= 12 of 16; the last ceilings approach the image)
    reconstruction["quality_summary"] = quality_summary(reconstruction, compare_up_to=3 * n // 4)
    metrics = {
        **generation,
        **reconstruction,
        "feature_extractor": cfg.feature_extractor,
        "torch_fidelity_extractor": scorer.extractor,
        "num_tokens": n,
        "fid_truncated": {str(k): row["fid"] for k, row in truncation.items()},
        "inception_score_truncated": {str(k): row["inception_score"] for k, row in truncation.items()},
        "class_accuracy_truncated": {str(k): row["class_accuracy"] for k, row in truncation.items()},
        "fid_truncated_num_samples": {str(k): row["num_samples"] for k, row in truncation.items()},
        "paper": PAPER,
        # telemetry (the timing file and MLflow, not the metrics): the feature extractor's images/s over
        # every image this stage embedded (samples, truncations, reals, reconstructions), what 50k samples cost
        "feature_extraction_seconds": round(scorer.embedding_seconds, 3),
        "feature_extraction_images_per_second": round(scorer.images_embedded / scorer.embedding_seconds, 1),
    }
    tables = {"generation.csv": _csv(generation_rows(metrics, val.manifest.get("source", "?"))),
              "truncation.csv": _csv(truncation_rows(truncation, n)),
              "reconstruction.csv": _csv(reconstruction_rows(metrics, codec.tokenizer.config.codebook_size))}
    out = Path(ctx.args.out)
    with atomic_path(out, directory=True) as tmp:
        for name, text in tables.items():
            (tmp / name).write_text(text)
        ctx.write_config(tmp, num_tokens=n, torch_fidelity_extractor=scorer.extractor,
                         truncated=[str(path) for path in truncated_files(ctx.args.samples).values()])
    for name in (*tables, "config.json"):
        ctx.tracker.log_artifact(out / name)
    score = metrics["inception_score"]
    ctx.log.info("%s: FID %.3f, IS %s, class accuracy %.3f, rFID %.3f (reconstruction class accuracy %.3f); "
                 "FID by dropped tokens %s", cfg.feature_extractor, metrics["fid"],
                 "n/a" if score is None else f"{score:.3f}", metrics["class_accuracy"], metrics["rfid"],
                 metrics["reconstruction_class_accuracy"],
                 ", ".join(f"k={k}: {fid:.3f}" for k, fid in metrics["fid_truncated"].items()))
    return metrics
