"""Table 1 and Figure 4 of the paper: how well earlier tokens linearly predict the next one.

The paper's setup text (§4.2) is lost; it says only that R² of t_k regressed on t_1..t_{k-1} is a
"proxy metric for the causality of sequences" and cites CIFAR. This module fixes a protocol.

Tokens. An image I (C, H, W; H and W divisible by 8) is written in four ordered steps. Each step
k has a *contribution* c_k (an image, sum_k c_k = I) and a *support* (the pixels it writes):

* raster:   c_k = I on quadrant k (raster order: TL, TR, BL, BR), 0 elsewhere; support = quadrant k.
* scale:    VAR's residual pyramid without quantisation (VAR ``quant.py``): with f̂_0 = 0,
            r_k = area-downsample(I - f̂_{k-1}) to H s_k x W s_k, s_k = 1/8, 1/4, 1/2, 1,
            c_k = bicubic-upsample(r_k) to H x W, f̂_k = f̂_{k-1} + c_k; support = all pixels.
* spectral: nested DCT bands of eq. 5: I'_k = IDCT(DCT(I) ∘ 1_{ω_k}) with ω_k = (H s_k, W s_k) for
            the same s_k, c_k = I'_k - I'_{k-1}; support = all pixels. (Orthonormal DCT-II per
            channel via scipy.fft, independent of ``spectralar.spectral``.)

The scale and spectral paradigms therefore carry the same number of degrees of freedom per step
(H s_k x W s_k values); they differ only in the basis. Each token is a pixel-space vector of
C·H·W elements in every paradigm, so lengths and coordinates agree and the Figure-4 map is an
image. Elements outside a token's support are constant zeros: they are skipped as outputs
(zero variance) and dropped as predictors (no information), and the skips are reported.

Two readings of "token", chosen by ``mode``:

* ``"canvas"`` (default): t_k = (c_1 + ... + c_k) on the support of step k, i.e. what the image
  looks like after step k where step k writes. For raster this is the quadrant itself; for the
  coarse-to-fine paradigms it is f̂_k (scale) and I'_k (spectral), the band-limited image the
  first k tokens decode to (Alg. 1). This is the reading under which the paper's numbers are
  possible: the spectral t_4 score of 0.994 needs t_4 = I with t_3 = I'_3.
* ``"increment"``: t_k = c_k, the new content only, a stricter question. On stationary random
  fields (1/f^1.5 spectrum) the DCT nearly decorrelates the bands and spectral increments score
  ≈ 0 (0.08/0.01/-0.02); on Fashion-MNIST, whose objects are centred, 0.69/0.57/0.51.

Without ridge both readings have the same regression residuals (t_k - c_k is a linear function
of the earlier tokens); then only the variance R² is normalised by differs.

Measured (canvas mode, 10k Fashion-MNIST training images at 32x32, 8k/2k split, defaults), R² for
t_2/t_3/t_4 and average: raster 0.515/0.540/0.741 (0.599), scale 0.803/0.909/0.868 (0.860),
spectral 0.734/0.774/0.909 (0.805); ~60 s per mode on one core. The paper's CIFAR figures are in
:data:`PAPER_TABLE1`; its ordering (spectral > scale) is not reproduced on this data.

Regression. For each paradigm and k = 2, 3, 4: multivariate ridge regression with intercept of
every element of t_k on all elements of t_1..t_{k-1}, pooled over images, fitted on a random
``train_fraction`` of the images (float64 normal equations, primal or dual whichever Gram matrix
is smaller, solved by its eigendecomposition) and scored on the held-out rest:
R²_j = 1 - SSE_j / SST_j per output element j, averaged over elements whose held-out variance is not negligible (see
:func:`r2_heldout`; the pooled 1 - ΣSSE/ΣSST is reported beside it). ``ridge`` is relative: the
penalty is ridge x the mean squared norm of a centred predictor column, so it is scale-free. By
default (``ridge=None``) it is chosen per regression on an inner validation split of the
training images (20 %, grid 1e-8..1e2). A fixed value biases the result: raster tokens have about
as many predictors as there are training images on small sets and overfit without it (measured
R² down to -8 held out, 600 images at 32x32), while coarse-to-fine tokens barely depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from spectralar.log import progress

logger = logging.getLogger("spectralar.evaluation.correlation")

Paradigm = Literal["raster", "scale", "spectral"]
TokenMode = Literal["canvas", "increment"]
PARADIGMS: tuple[str, ...] = ("raster", "scale", "spectral")
NUM_TOKENS = 4
SCALE_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)

# Table 1 of the paper: R²_avg(t_k; t_1..t_{k-1}) for k = 2, 3, 4 and their average.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "raster": {"r2_t2": 0.471, "r2_t3": 0.366, "r2_t4": 0.525, "average": 0.454},
    "scale": {"r2_t2": 0.889, "r2_t3": 0.953, "r2_t4": 0.943, "average": 0.928},
    "spectral": {"r2_t2": 0.916, "r2_t3": 0.977, "r2_t4": 0.994, "average": 0.962},
}


# --------------------------------------------------------------------------------------------
# Contributions and tokens
# --------------------------------------------------------------------------------------------

def _check_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    array = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images)
    if array.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"images must be float (values in [0, 1]), got dtype {array.dtype}")
    height, width = array.shape[-2:]
    if height % 8 or width % 8:
        raise ValueError(f"images height and width must be divisible by 8, got {height} x {width}")
    return array.astype(np.float64, copy=False)


def downsample(images: np.ndarray, resolution: Optional[int]) -> np.ndarray:
    """(N, C, H, W) floats at ``resolution`` x ``resolution`` by area averaging (a box filter when H is
    a multiple of it); None or the images' own size: unchanged. Upsampling is refused."""
    height, width = images.shape[-2:]
    if resolution is None or (height, width) == (resolution, resolution):
        return images
    if resolution > min(height, width):
        raise ValueError(f"correlation.resolution {resolution} exceeds the images' {height} x {width}")
    pooled = F.interpolate(torch.from_numpy(np.ascontiguousarray(images)), size=(resolution, resolution), mode="area")
    return pooled.numpy()


def _scale_sizes(height: int, width: int) -> list[tuple[int, int]]:
    return [(round(height * s), round(width * s)) for s in SCALE_FRACTIONS]


def raster_contributions(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 4, C, H, W): each quadrant in place, zeros elsewhere, raster order."""
    height, width = images.shape[-2:]
    out = np.zeros((len(images), NUM_TOKENS) + images.shape[1:])  # (N, 4, C, H, W)
    for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        rows = slice(row * height // 2, (row + 1) * height // 2)
        cols = slice(col * width // 2, (col + 1) * width // 2)
        out[:, k, :, rows, cols] = images[:, :, rows, cols]
    return out


def scale_contributions(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 4, C, H, W): VAR residual pyramid (area down, bicubic up), unquantised."""
    height, width = images.shape[-2:]
    image = torch.from_numpy(np.ascontiguousarray(images))  # (N, C, H, W) float64
    canvas = torch.zeros_like(image)  # f̂_k
    out = []
    for size in _scale_sizes(height, width):
        residual = F.interpolate(image - canvas, size=size, mode="area")  # (N, C, h_k, w_k)
        if size != (height, width):
            residual = F.interpolate(residual, size=(height, width), mode="bicubic", align_corners=False)
        canvas = canvas + residual
        out.append(residual)
    return torch.stack(out, dim=1).numpy()  # (N, 4, C, H, W)


def spectral_contributions(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 4, C, H, W): DCT bands I'_k - I'_{k-1} (eq. 5, ω_k = H/8, H/4, H/2, H)."""
    height, width = images.shape[-2:]
    spectrum = scipy.fft.dctn(images, type=2, axes=(-2, -1), norm="ortho")  # (N, C, H, W)
    previous = np.zeros_like(images)
    out = []
    for omega_h, omega_w in _scale_sizes(height, width):
        kept = np.zeros_like(spectrum)
        kept[..., :omega_h, :omega_w] = spectrum[..., :omega_h, :omega_w]
        lowpassed = scipy.fft.idctn(kept, type=2, axes=(-2, -1), norm="ortho")  # I'_k
        out.append(lowpassed - previous)
        previous = lowpassed
    return np.stack(out, axis=1)  # (N, 4, C, H, W)


_CONTRIBUTIONS = {
    "raster": raster_contributions, "scale": scale_contributions, "spectral": spectral_contributions,
}


def supports(paradigm: Paradigm, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean (4, C, H, W): the pixels each step writes."""
    if paradigm == "raster":
        return raster_contributions(np.ones((1,) + tuple(shape)))[0] != 0
    if paradigm in ("scale", "spectral"):
        return np.ones((NUM_TOKENS,) + tuple(shape), dtype=bool)
    raise ValueError(f"paradigm must be one of {PARADIGMS}, got {paradigm!r}")


def make_tokens(images: np.ndarray | torch.Tensor, paradigm: Paradigm, mode: TokenMode = "canvas") -> np.ndarray:
    """(N, C, H, W) float -> tokens (N, 4, C·H·W) float64 under the module docstring's protocol."""
    array = _check_images(images)
    if paradigm not in _CONTRIBUTIONS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, got {paradigm!r}")
    contributions = _CONTRIBUTIONS[paradigm](array)  # (N, 4, C, H, W)
    if mode == "canvas":
        support = supports(paradigm, array.shape[1:])  # (4, C, H, W)
        contributions = np.cumsum(contributions, axis=1) * support  # canvas after step k, where k writes
    elif mode != "increment":
        raise ValueError(f"mode must be 'canvas' or 'increment', got {mode!r}")
    return contributions.reshape(len(array), NUM_TOKENS, -1)


def reconstruct(
    tokens: np.ndarray, paradigm: Paradigm, shape: tuple[int, int, int], mode: TokenMode = "canvas"
) -> np.ndarray:
    """Tokens (N, 4, C·H·W) -> images (N, C, H, W), the inverse of :func:`make_tokens`.

    Increments add up to the image. Canvases are read where their step wrote last: the quadrant for
    raster, the final canvas t_4 for the coarse-to-fine paradigms.
    """
    tokens = np.asarray(tokens).reshape((len(tokens), NUM_TOKENS) + tuple(shape))  # (N, 4, C, H, W)
    if mode == "increment":
        return tokens.sum(axis=1)
    support = supports(paradigm, shape)  # (4, C, H, W)
    written_later = np.flip(np.cumsum(np.flip(support, 0), 0), 0) - support  # steps > k writing each pixel
    last_writer = support & (written_later == 0)
    return (tokens * last_writer).sum(axis=1)


# --------------------------------------------------------------------------------------------
# Held-out ridge R²
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class R2Result:
    """Held-out R²: per element (NaN where skipped), their mean over scored elements, the pooled
    (variance-weighted) 1 - ΣSSE/ΣSST over the same elements, the skip count and the relative ridge."""

    per_element: np.ndarray
    average: float
    pooled: float
    num_skipped: int
    ridge: float


# Relative ridge values tried when ``ridge`` is None (an inner validation split picks one).
RIDGE_GRID: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-8.0, 2.01, 0.5))
INNER_VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class _RidgePath:
    """Ridge predictions for any λ from one eigendecomposition: Q diag(1/(s² + λ)) R + mean."""

    left: np.ndarray  # (m, r)
    eigenvalues: np.ndarray  # (r,) squared singular values of the centred predictors
    right: np.ndarray  # (r, L)
    y_mean: np.ndarray  # (L,)
    scale: float  # mean squared norm of a centred predictor column: λ = relative ridge x scale

    def predict(self, relative_ridge: float) -> np.ndarray:
        weight = 1.0 / (self.eigenvalues + relative_ridge * self.scale)  # (r,)
        return self.left @ (weight[:, None] * self.right) + self.y_mean  # (m, L)


def _ridge_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> _RidgePath:
    """Centred ridge with an unpenalised intercept, primal (P <= n) or dual (P > n) form.

    The eigendecomposition of the smaller Gram matrix (``eigh``) replaces an SVD: same fit, and
    an order of magnitude faster with the BLAS/LAPACK here.
    """
    x_mean, y_mean = x_train.mean(axis=0), y_train.mean(axis=0)
    xc, yc, xt = x_train - x_mean, y_train - y_mean, x_test - x_mean  # (n, P), (n, L), (m, P)
    if xc.shape[1] == 0:
        return _RidgePath(np.zeros((len(xt), 0)), np.zeros(0), np.zeros((0, yc.shape[1])), y_mean, 1.0)
    primal = xc.shape[1] <= xc.shape[0]
    eigenvalues, basis = np.linalg.eigh(xc.T @ xc if primal else xc @ xc.T)  # (r,), (P or n, r)
    keep = eigenvalues > max(float(eigenvalues.max()), 0.0) * 1e-12
    eigenvalues, basis = eigenvalues[keep], basis[:, keep]
    if primal:  # B = V (S² + λ)^-1 Vᵀ Xᵀ Y
        left, right = xt @ basis, basis.T @ (xc.T @ yc)
    else:  # B = Xᵀ U (S² + λ)^-1 Uᵀ Y
        left, right = (xt @ xc.T) @ basis, basis.T @ yc
    scale = float(eigenvalues.sum()) / xc.shape[1] if eigenvalues.size else 1.0
    return _RidgePath(left, eigenvalues, right, y_mean, scale)


def _select_ridge(x_train: np.ndarray, y_train: np.ndarray) -> float:
    """The RIDGE_GRID value with the least squared error on an inner validation split of the training rows.

    (Generalised cross-validation is cheaper but degenerates to λ -> 0 when predictors outnumber
    images, exactly the raster case on small sets.)
    """
    order = np.random.default_rng(0).permutation(len(x_train))
    num_validation = max(1, int(round(INNER_VALIDATION_FRACTION * len(x_train))))
    validation, fit = order[:num_validation], order[num_validation:]
    path = _ridge_path(x_train[fit], y_train[fit], x_train[validation])
    errors = [float(np.sum((y_train[validation] - path.predict(r)) ** 2)) for r in RIDGE_GRID]
    return RIDGE_GRID[int(np.argmin(errors))]


def r2_heldout(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    ridge: Optional[float] = None,
    variance_tolerance: float = 1e-3,
) -> R2Result:
    """Fit Y ≈ X B + b on the training rows, score R² per column of Y on the test rows.

    ``ridge`` is relative (module docstring); None picks it from :data:`RIDGE_GRID` on an inner
    validation split of the training rows only, so the held-out score stays honest. Predictor
    columns constant on the training rows carry no information and are dropped (exact). Output
    columns whose held-out variance is at most ``variance_tolerance`` x the largest one are skipped;
    ``num_skipped`` counts them and ``average`` is over the rest. The tolerance is not 0 on purpose:
    an element that is almost always constant (the black frame around Fashion-MNIST's 28x28 images
    in a 32x32 canvas) has an R² of -100 or worse from a few held-out images, and a handful of such
    elements would dominate the mean (measured: spectral t_4 mean 0.04 with them, 0.89 without,
    median 0.90). Zero-variance elements (structural zeros) are skipped under any tolerance.
    """
    x_train, y_train = np.asarray(x_train, np.float64), np.asarray(y_train, np.float64)
    x_test, y_test = np.asarray(x_test, np.float64), np.asarray(y_test, np.float64)
    if x_train.ndim != 2 or y_train.ndim != 2 or x_test.ndim != 2 or y_test.ndim != 2:
        raise ValueError("x_train, y_train, x_test and y_test must be 2-D (images, elements)")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test) or len(x_train) < 2 or len(x_test) < 2:
        raise ValueError(f"need >= 2 matching train and test rows, got {len(x_train)}/{len(y_train)} train, "
                         f"{len(x_test)}/{len(y_test)} test")
    if x_train.shape[1] != x_test.shape[1] or y_train.shape[1] != y_test.shape[1]:
        raise ValueError("train and test must have the same number of predictor and output columns")
    if ridge is not None and ridge < 0:
        raise ValueError(f"ridge must be >= 0 or None, got {ridge}")
    informative = np.ptp(x_train, axis=0) > 0
    x_train, x_test = x_train[:, informative], x_test[:, informative]
    if ridge is None:
        if len(x_train) < 5:
            raise ValueError(f"choosing the ridge needs >= 5 training rows, got {len(x_train)}: pass ridge=")
        ridge = _select_ridge(x_train, y_train)
    prediction = _ridge_path(x_train, y_train, x_test).predict(ridge)
    sse = np.sum((y_test - prediction) ** 2, axis=0)
    sst = np.sum((y_test - y_test.mean(axis=0)) ** 2, axis=0)
    scored = sst > variance_tolerance * max(float(sst.max()), np.finfo(np.float64).tiny)
    per_element = np.full(sst.shape, np.nan)
    per_element[scored] = 1.0 - sse[scored] / sst[scored]
    average = float(per_element[scored].mean()) if scored.any() else float("nan")
    pooled = float(1.0 - sse[scored].sum() / sst[scored].sum()) if scored.any() else float("nan")
    return R2Result(per_element, average, pooled, num_skipped=int((~scored).sum()), ridge=ridge)


# --------------------------------------------------------------------------------------------
# Table 1 and Figure 4
# --------------------------------------------------------------------------------------------

def _split(num_images: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = np.random.default_rng(seed).permutation(num_images)
    num_train = int(round(train_fraction * num_images))
    if num_train < 2 or num_images - num_train < 2:
        raise ValueError(f"{num_images} images with train_fraction={train_fraction} leave < 2 train/test images")
    return order[:num_train], order[num_train:]


def correlation_table(
    images: np.ndarray | torch.Tensor,
    *,
    train_fraction: float = 0.8,
    ridge: Optional[float] = None,
    seed: int = 0,
    mode: TokenMode = "canvas",
    paradigms: tuple[str, ...] = PARADIGMS,
    variance_tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Table 1: {paradigm: {r2_t2, r2_t3, r2_t4, average}} plus ``"protocol"``.

    The protocol entry records the split sizes, token length, skipped elements, the ridge chosen
    per regression and the pooled R² per regression. Memory: tokens are (N, 4, C·H·W) float64 per
    paradigm, e.g. 330 MB for 10k Fashion-MNIST images at 32x32.
    """
    array = _check_images(images)
    train, test = _split(len(array), train_fraction, seed)
    table: dict[str, Any] = {}
    skipped: dict[str, dict[str, int]] = {}
    ridges: dict[str, dict[str, float]] = {}
    pooled: dict[str, dict[str, float]] = {}
    for paradigm in progress(paradigms, desc="correlation", unit="paradigm", log_every=1, logger=logger):
        tokens = make_tokens(array, paradigm, mode)  # (N, 4, L)
        row, skipped[paradigm], ridges[paradigm], pooled[paradigm] = {}, {}, {}, {}
        for k in range(2, NUM_TOKENS + 1):
            x = tokens[:, : k - 1].reshape(len(tokens), -1)  # (N, (k-1) L)
            y = tokens[:, k - 1]  # (N, L)
            result = r2_heldout(x[train], y[train], x[test], y[test], ridge, variance_tolerance)
            row[f"r2_t{k}"] = result.average
            skipped[paradigm][f"t{k}"] = result.num_skipped
            ridges[paradigm][f"t{k}"] = result.ridge
            pooled[paradigm][f"t{k}"] = result.pooled
        row["average"] = float(np.mean([row[f"r2_t{k}"] for k in range(2, NUM_TOKENS + 1)]))
        table[paradigm] = row
        logger.info("R² %s (%s): %s", paradigm, mode, {key: round(value, 4) for key, value in row.items()})
    table["protocol"] = {
        "mode": mode, "ridge": ridge, "seed": seed, "variance_tolerance": variance_tolerance,
        "num_train": len(train), "num_test": len(test), "token_length": int(np.prod(array.shape[1:])),
        "skipped_elements": skipped, "ridge_used": ridges, "pooled_r2": pooled,
    }
    return table


def best_predictor_map(
    images: np.ndarray | torch.Tensor,
    paradigm: Paradigm,
    step: int = NUM_TOKENS,
    mode: TokenMode = "canvas",
    chunk: int = 1024,
) -> np.ndarray:
    """Figure 4: for each element of t_step, the single earlier element with the largest |correlation|.

    Returns int64 counts (step - 1, C, H, W): how many elements of t_step chose each element of
    t_1..t_{step-1} (correlations over all images; zero-variance elements never choose nor are chosen).
    """
    if not 2 <= step <= NUM_TOKENS:
        raise ValueError(f"step must be in 2..{NUM_TOKENS}, got {step}")
    array = _check_images(images)
    tokens = make_tokens(array, paradigm, mode)  # (N, 4, L)
    earlier = _standardise(tokens[:, : step - 1].reshape(len(tokens), -1))  # (N, (step-1) L)
    target = _standardise(tokens[:, step - 1])  # (N, L)
    live = np.any(target != 0, axis=0)  # outputs with non-zero variance
    counts = np.zeros(earlier.shape[1], dtype=np.int64)
    for start in range(0, target.shape[1], chunk):
        block = target[:, start : start + chunk]  # (N, c)
        correlation = np.abs(block.T @ earlier)  # (c, (step-1) L), /N omitted: argmax only
        best = correlation.argmax(axis=1)
        counts += np.bincount(best[live[start : start + chunk]], minlength=earlier.shape[1])
    return counts.reshape((step - 1,) + array.shape[1:])


def _standardise(matrix: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance; constant columns become zeros (correlation 0)."""
    centred = matrix - matrix.mean(axis=0)
    scale = np.sqrt(np.mean(centred * centred, axis=0))
    return np.divide(centred, scale, out=np.zeros_like(centred), where=scale > 1e-12 * max(scale.max(), 1e-300))


def render_best_predictor_map(
    maps: np.ndarray | Mapping[str, np.ndarray], path: str | Path, title: Optional[str] = None
) -> None:
    """Write Figure-4 style panels to a PNG: one row per map, one panel per earlier token.

    Counts are summed over channels. The panels of a row share one colour scale, from 0 to the row's
    largest count, with a colour bar: a panel's brightness then reads as a count, comparable across
    the earlier tokens. Uses matplotlib's Agg canvas directly (no pyplot global state); the PNG carries
    no software version, so the bytes depend only on the maps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from spectralar.io import atomic_path

    rows = {"": maps} if isinstance(maps, np.ndarray) else dict(maps)
    columns = max(len(counts) for counts in rows.values())
    figure = Figure(figsize=(2.2 * columns + 1.0, 2.2 * len(rows) + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (label, counts) in enumerate(rows.items()):
        panels = [np.asarray(counts[c]).sum(axis=0) for c in range(len(counts))]  # (H, W) each
        top = max(1, max(int(panel.max()) for panel in panels))
        for c in range(columns):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(panels):
                image = axis.imshow(panels[c], cmap="magma", interpolation="nearest", vmin=0, vmax=top)
                axis.set_title(f"{label} t{c + 1}".strip(), fontsize=8)
            else:
                axis.set_axis_off()
        bar = figure.colorbar(image, ax=list(axes[r]), shrink=0.9)
        bar.set_label("elements of the last token\nbest predicted here", fontsize=7)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        bar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
