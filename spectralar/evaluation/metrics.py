"""Sample-quality metrics (paper §4, Tables 2-4) computed with torch-fidelity's own functions.

The flow is features first, metrics second, so a reference set is embedded once and reused:

    reference = reference_statistics(extract_features(real, name, kwargs)["features"])
    metrics = compute_metrics(extract_features(samples, name, kwargs), reference)

Features are returned under two extractor-independent keys: ``"features"`` (the layer torch-fidelity
uses for FID/KID/precision-recall: Inception pool3 "2048", the domain net's "features") and, when the
network has a classifier, ``"logits"`` (the layer torch-fidelity uses for IS: Inception
"logits_unbiased", the domain net's "logits").

Conventions (ADM's evaluation suite and torch-fidelity): images are uint8 (N, C, H, W) with C = 1 or 3 (grey is repeated to RGB,
as torch-fidelity's inputs are N x 3 x H x W); FID statistics are float64 (ADM's reference ``mu``/
``sigma`` are cast too); torch-fidelity shuffles before the IS splits, so class-sorted sample files
are fine here but not under ADM's evaluator; feature caching is never used (no ``cache_root`` is
involved: features are extracted from an in-memory dataset, which torch-fidelity does not cache).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from spectralar.evaluation.domain import class_accuracy
from spectralar.evaluation.extractors import has_logits, register_extractors
from spectralar.log import progress

logger = logging.getLogger("spectralar.evaluation.metrics")

__all__ = [
    "class_accuracy",
    "compute_metrics",
    "extract_features",
    "load_adm_reference",
    "load_reference",
    "reference_statistics",
    "save_reference",
    "validate_samples",
]

FEATURES, LOGITS = "features", "logits"
ADM_KEYS = ("arr_0", "mu", "sigma")


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

def _guess_layout(shape: tuple[int, ...]) -> Literal["nhwc", "nchw"]:
    channels_last, channels_first = shape[3] in (1, 3), shape[1] in (1, 3)
    if channels_last and not channels_first:
        return "nhwc"
    if channels_first and not channels_last:
        return "nchw"
    if channels_last and channels_first:
        raise ValueError(f"samples of shape {shape} are ambiguous (N, H, W, C) or (N, C, H, W): pass layout=")
    raise ValueError(f"samples must have 1 or 3 channels as (N, H, W, C) or (N, C, H, W), got shape {shape}")


def validate_samples(
    array: np.ndarray | torch.Tensor, layout: Literal["auto", "nhwc", "nchw"] = "auto"
) -> torch.Tensor:
    """Check a batch of images and return it as a uint8 tensor (N, C, H, W).

    Accepts ADM's .npz layout (N, H, W, C) and torch's (N, C, H, W), C in {1, 3}. Integer arrays of
    another dtype are accepted when every value lies in 0..255; floats and bools are rejected (a float
    image in [0, 1] saved by mistake would otherwise score as a black image).
    """
    tensor = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array)
    if tensor.dim() != 4:
        raise ValueError(f"samples must be 4-D (N, H, W, C) or (N, C, H, W), got shape {tuple(tensor.shape)}")
    if len(tensor) == 0:
        raise ValueError("samples are empty (N = 0)")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"samples must be uint8 in 0..255, got dtype {tensor.dtype}")
    if tensor.dtype != torch.uint8:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > 255:
            raise ValueError(f"samples must be uint8 in 0..255, got {tensor.dtype} with range [{low}, {high}]")
        tensor = tensor.to(torch.uint8)
    if layout == "auto":
        layout = _guess_layout(tuple(tensor.shape))
    if layout == "nhwc":
        tensor = tensor.permute(0, 3, 1, 2)  # (N, C, H, W)
    elif layout != "nchw":
        raise ValueError(f"layout must be 'auto', 'nhwc' or 'nchw', got {layout!r}")
    if tensor.shape[1] not in (1, 3):
        raise ValueError(f"samples must have 1 or 3 channels, got {tensor.shape[1]} (layout {layout})")
    return tensor.contiguous()


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

class _ImageTensorDataset(Dataset):
    """An in-memory uint8 (N, 3, H, W) tensor seen as a torch-fidelity input (one image per item)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]  # (3, H, W) uint8


def _layers(extractor_name: str) -> dict[str, str]:
    """Our canonical keys -> the extractor's layer names, from its own per-metric defaults."""
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor_name]
    layers = {FEATURES: cls.get_default_feature_layer_for_metric("fid")}
    if has_logits(extractor_name):
        layers[LOGITS] = cls.get_default_feature_layer_for_metric("isc")
    return layers


def extract_features(
    images: torch.Tensor | np.ndarray,
    extractor_name: str,
    extractor_kwargs: Optional[Mapping[str, Any]] = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Embed uint8 images with a torch-fidelity feature extractor: {"features": (N, D)[, "logits": (N, K)]}.

    Runs torch-fidelity's ``create_feature_extractor`` + ``get_featuresdict_from_dataset`` (eval mode,
    no gradients, no worker processes). None of our extractors has a batch-dependent operation, so the
    result does not depend on ``batch_size``. Tensors come back float32 on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = validate_samples(images, layout="nchw")  # (N, C, H, W); ADM's NHWC: call validate_samples first
    images = images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images  # (N, 3, H, W)
    register_extractors()
    if extractor_name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"extractor_name {extractor_name!r} is not a registered torch-fidelity feature extractor")
    layers = _layers(extractor_name)
    device = torch.device(device)
    cuda = device.type == "cuda"
    kwargs = dict(extractor_kwargs or {})
    kwargs.setdefault("verbose", False)
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        extractor = create_feature_extractor(extractor_name, sorted(set(layers.values())), cuda=cuda, **kwargs)
        # Chunks of whole batches: the batches, and so the features, are those of one pass over all images.
        chunk = batch_size * 20
        parts = [get_featuresdict_from_dataset(_ImageTensorDataset(images[start:start + chunk]), extractor, batch_size,
                                               cuda, save_cpu_ram=True, verbose=False)
                 for start in progress(range(0, len(images), chunk), desc=f"features ({extractor_name})",
                                       unit="chunk", log_every=10, logger=logger)]
        by_layer = {layer: torch.cat([part[layer] for part in parts]) for layer in parts[0]}
    return {key: by_layer[layer].to(torch.float32).cpu() for key, layer in layers.items()}


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------

def _feature_matrix(features: torch.Tensor | np.ndarray | Mapping[str, Any]) -> torch.Tensor:
    if isinstance(features, Mapping):
        if FEATURES not in features:
            raise ValueError(f"features dict must have key {FEATURES!r}, got {sorted(features)}")
        features = features[FEATURES]
    matrix = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if matrix.dim() != 2 or len(matrix) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(matrix.shape)}")
    return matrix.detach().cpu()


def _fid_statistics(matrix: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's mean/covariance, computed in float64 on both sides of every comparison."""
    stats = fid_featuresdict_to_statistics({FEATURES: matrix.to(torch.float64)}, FEATURES)
    return {"mu": np.asarray(stats["mu"], dtype=np.float64), "sigma": np.asarray(stats["sigma"], dtype=np.float64)}


def reference_statistics(
    features: torch.Tensor | np.ndarray | Mapping[str, Any], keep_features: bool = True
) -> dict[str, Any]:
    """{"mu": (D,) float64, "sigma": (D, D) float64, "features": (N, D) float32 or None, "num_samples": N}.

    The raw features are kept for KID and precision/recall, which compare sample sets, not moments.
    """
    matrix = _feature_matrix(features)
    stats = _fid_statistics(matrix)
    stats["features"] = matrix.to(torch.float32) if keep_features else None
    stats["num_samples"] = len(matrix)
    return stats


def save_reference(path: str | Path, reference: Mapping[str, Any]) -> None:
    """Write mu, sigma (and features when present) to an .npz, atomically."""
    from spectralar.io import atomic_path

    arrays = {"mu": np.asarray(reference["mu"], np.float64), "sigma": np.asarray(reference["sigma"], np.float64)}
    if reference.get("features") is not None:
        arrays["features"] = np.asarray(torch.as_tensor(reference["features"]).cpu(), np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_reference(path: str | Path) -> dict[str, Any]:
    """Read an .npz written by :func:`save_reference` (the reference_stats stage's output folder)."""
    from spectralar.io import open_npz, rerun_hint

    with open_npz(path, rerun_hint("reference_stats", Path(path).parent)) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(data.files)}")
        features = torch.from_numpy(data["features"]) if "features" in data.files else None
        reference = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64)}
    reference["features"] = features
    reference["num_samples"] = None if features is None else len(features)
    _check_statistics(reference, str(path))
    return reference


def load_adm_reference(path: str | Path, load_images: bool = True) -> dict[str, Any]:
    """Read ADM's reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``).

    Keys used: ``arr_0`` reference images uint8 (N, H, W, 3), ``mu``/``sigma`` pool3 statistics (cast
    to float64, as ADM's evaluator does). Returns {"mu", "sigma", "images" (uint8 (N, 3, H, W) tensor or None),
    "features": None, "num_samples"}. KID/precision/recall need the images embedded with the same
    extractor as the samples: ``reference_statistics(extract_features(ref["images"], ...))``.
    """
    from spectralar.io import open_npz

    with open_npz(path) as data:
        missing = [key for key in ADM_KEYS if key not in data.files]
        if missing:
            raise ValueError(
                f"{path}: not an ADM reference batch, missing key(s) {missing} (expected {list(ADM_KEYS)}); "
                f"found {sorted(data.files)}"
            )
        reference: dict[str, Any] = {
            "mu": data["mu"].astype(np.float64),
            "sigma": data["sigma"].astype(np.float64),
            "features": None,
        }
        images = validate_samples(data["arr_0"], layout="nhwc") if load_images else None
    reference["images"] = images
    reference["num_samples"] = None if images is None else len(images)
    _check_statistics(reference, str(path))
    return reference


def _check_statistics(reference: Mapping[str, Any], where: str) -> None:
    mu, sigma = reference["mu"], reference["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _fid(samples: torch.Tensor, reference: Mapping[str, Any]) -> float:
    if samples.shape[1] != len(reference["mu"]):
        raise ValueError(f"sample features are {samples.shape[1]}-d but the reference is {len(reference['mu'])}-d")
    stats = _fid_statistics(samples)
    ref_stats = {
        "mu": np.asarray(reference["mu"], np.float64), "sigma": np.asarray(reference["sigma"], np.float64),
    }
    return float(fid_statistics_to_metric(stats, ref_stats, verbose=False)[KEY_METRIC_FID])


def _inception_score(sample_features: Mapping[str, torch.Tensor], splits: int, seed: int) -> dict[str, Any]:
    if LOGITS not in sample_features:
        note = "the feature extractor has no classifier logits (e.g. inception-fidhelper); IS needs them"
        return {"inception_score": None, "inception_score_std": None, "inception_score_note": note}
    logits = sample_features[LOGITS]
    used_splits = min(splits, len(logits))  # torch-fidelity gives NaN for empty splits
    out = isc_featuresdict_to_metric(
        {LOGITS: logits}, LOGITS, isc_splits=used_splits, samples_shuffle=True, rng_seed=seed, verbose=False
    )
    return {
        "inception_score": float(out[KEY_METRIC_ISC_MEAN]),
        "inception_score_std": float(out[KEY_METRIC_ISC_STD]),
        "inception_score_note": None,
        "isc_splits": used_splits,
    }


def _kid(samples: torch.Tensor, ref_features: torch.Tensor, subset_size: int, subsets: int, seed: int) -> dict:
    used = min(subset_size, len(samples), len(ref_features))
    if used != subset_size:
        logger.info("KID subset size clamped from %d to %d (number of samples)", subset_size, used)
    out = kid_featuresdict_to_metric(
        {FEATURES: samples}, {FEATURES: ref_features}, FEATURES,
        kid_subsets=subsets, kid_subset_size=used, rng_seed=seed, verbose=False,
    )
    return {
        "kid": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]), "kid_subset_size": used,
    }


def _precision_recall(
    samples: torch.Tensor, ref_features: torch.Tensor, neighborhood: int, device: torch.device
) -> dict[str, Any]:
    # The "part" variant (save_cpu_ram) gives the same numbers without an N x N distance matrix.
    out = prc_featuresdict_to_metric(
        {FEATURES: samples.to(device)}, {FEATURES: ref_features.to(device)}, FEATURES,
        prc_neighborhood=neighborhood, save_cpu_ram=True, verbose=False,
    )
    return {"precision": float(out[KEY_METRIC_PRECISION]), "recall": float(out[KEY_METRIC_RECALL])}


def compute_metrics(
    sample_features: Mapping[str, torch.Tensor],
    reference: Mapping[str, Any],
    *,
    fid: bool = True,
    isc: bool = True,
    kid: bool = True,
    prc: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    seed: int = 2020,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID, IS, KID, precision and recall of samples against a reference, as plain Python numbers.

    ``sample_features`` comes from :func:`extract_features`; ``reference`` from
    :func:`reference_statistics`, :func:`load_reference` or :func:`load_adm_reference`. Metrics that
    were not requested are absent from the result; requested metrics that cannot be computed are
    None with a ``*_note`` saying why (IS without logits; KID/PRC without reference features).
    ``seed`` is torch-fidelity's ``rng_seed`` (IS shuffling, KID subsets), default its own 2020.
    """
    samples = _feature_matrix(sample_features).to(torch.float32)
    ref_features = reference.get("features")
    ref_features = None if ref_features is None else _feature_matrix(ref_features).to(torch.float32)
    if ref_features is not None and ref_features.shape[1] != samples.shape[1]:
        raise ValueError(f"sample features are {samples.shape[1]}-d, reference features {ref_features.shape[1]}-d")
    no_reference = "needs reference features (ADM's .npz has only mu/sigma: embed its images)"
    out: dict[str, Any] = {"num_samples": len(samples), "num_reference": reference.get("num_samples")}
    if fid:
        out["fid"] = _fid(samples, reference)
    if isc:
        out.update(_inception_score(sample_features, isc_splits, seed))
    if kid and ref_features is None:
        out.update({"kid": None, "kid_std": None, "kid_note": f"KID {no_reference}"})
    elif kid:
        if kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be at least 2, got {kid_subset_size}")
        out.update(_kid(samples, ref_features, kid_subset_size, kid_subsets, seed))
    if prc and ref_features is None:
        note = f"precision/recall {no_reference}"
        out.update({"precision": None, "recall": None, "precision_recall_note": note})
    elif prc:
        if min(len(samples), len(ref_features)) <= prc_neighborhood:
            raise ValueError(f"precision/recall needs > prc_neighborhood={prc_neighborhood} samples per set")
        out.update(_precision_recall(samples, ref_features, prc_neighborhood, torch.device(device)))
    return out
