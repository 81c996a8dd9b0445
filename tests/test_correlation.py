"""Tests for spectralar.evaluation.correlation: tokens of the three paradigms, held-out ridge R²,
Table 1 and the Figure-4 map.

The DCT bands are checked against an explicit DCT-II matrix built from eq. 2 (not scipy), the
regression against numpy's least squares, and the R² definition against its formula.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectralar.evaluation import correlation as C

try:  # optional: present with scikit-learn; limits OpenBLAS threads
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One BLAS thread: on the shared 2-core machines two busy-waiting threads made the regressions
    50x slower whenever other processes held a core."""
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def _powerlaw_images(n: int, size: int, beta: float = 1.5, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth random images: Gaussian noise low-passed by an amplitude spectrum 1/f^beta (natural
    images have beta ≈ 1), scaled to roughly [0, 1]. Generated periodic at twice the size and
    cropped, so opposite borders are not correlated through the wrap-around."""
    rng = np.random.default_rng(seed)
    full = 2 * size
    frequency = np.sqrt(np.fft.fftfreq(full)[:, None] ** 2 + np.fft.fftfreq(full)[None, :] ** 2)
    frequency[0, 0] = 1.0 / full
    noise = rng.standard_normal((n, channels, full, full)) + 1j * rng.standard_normal((n, channels, full, full))
    images = np.fft.ifft2(noise * frequency**-beta).real[..., :size, :size]
    return images / (4 * images.std()) + 0.5


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II (eq. 2): D[u, x] = α(u) cos(π (2x + 1) u / 2n)."""
    u, x = np.arange(n)[:, None], np.arange(n)[None, :]
    alpha = np.where(u == 0, math.sqrt(1 / n), math.sqrt(2 / n))
    return alpha * np.cos(math.pi * (2 * x + 1) * u / (2 * n))


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paradigm", C.PARADIGMS)
@pytest.mark.parametrize("mode", ["canvas", "increment"])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 24)])
def test_token_shapes_and_exact_reconstruction(paradigm, mode, shape):
    images = np.random.default_rng(1).uniform(size=(3,) + shape)
    tokens = C.make_tokens(images, paradigm, mode)
    assert tokens.shape == (3, 4, int(np.prod(shape)))  # every token has the same length C·H·W
    np.testing.assert_allclose(C.reconstruct(tokens, paradigm, shape, mode), images, atol=1e-12)


def test_raster_tokens_are_quadrants_in_raster_order():
    images = np.random.default_rng(2).uniform(size=(2, 1, 8, 8))
    tokens = C.make_tokens(images, "raster").reshape(2, 4, 1, 8, 8)
    for k, (rows, cols) in enumerate([(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                                      (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]):
        np.testing.assert_array_equal(tokens[:, k, :, rows, cols], images[:, :, rows, cols])
        assert np.abs(tokens[:, k]).sum() == pytest.approx(np.abs(images[:, :, rows, cols]).sum())


def test_spectral_tokens_match_an_explicit_dct_matrix():
    images = np.random.default_rng(3).uniform(size=(2, 2, 16, 8))
    dct_h, dct_w = _dct_matrix(16), _dct_matrix(8)
    spectrum = dct_h @ images @ dct_w.T  # (N, C, 16, 8)
    canvas = C.make_tokens(images, "spectral", "canvas").reshape(2, 4, 2, 16, 8)
    increment = C.make_tokens(images, "spectral", "increment").reshape(2, 4, 2, 16, 8)
    previous = np.zeros_like(images)
    for k, fraction in enumerate((8, 4, 2, 1)):
        kept = np.zeros_like(spectrum)
        kept[..., : 16 // fraction, : 8 // fraction] = spectrum[..., : 16 // fraction, : 8 // fraction]
        lowpassed = dct_h.T @ kept @ dct_w  # I'_k (eq. 5)
        np.testing.assert_allclose(canvas[:, k], lowpassed, atol=1e-12)
        np.testing.assert_allclose(increment[:, k], lowpassed - previous, atol=1e-12)
        previous = lowpassed


def test_scale_tokens_follow_the_var_residual_pyramid():
    images = np.random.default_rng(4).uniform(size=(2, 1, 16, 16))
    tokens = C.make_tokens(images, "scale", "increment").reshape(2, 4, 1, 16, 16)
    image = torch.from_numpy(images)
    first = F.interpolate(F.interpolate(image, size=(2, 2), mode="area"), size=(16, 16), mode="bicubic")
    np.testing.assert_allclose(tokens[:, 0], first.numpy(), atol=1e-12)
    canvas = tokens[:, :3].sum(axis=1)
    # The last step is the full-resolution residual: nothing left after it.
    np.testing.assert_allclose(tokens[:, 3], images - canvas, atol=1e-12)
    constant = C.make_tokens(np.full((1, 1, 16, 16), 0.3), "scale", "increment").reshape(4, 16, 16)
    np.testing.assert_allclose(constant[0], 0.3, atol=1e-12)
    np.testing.assert_allclose(constant[1:], 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 1, 12, 16)), "divisible by 8"),
        (np.zeros((2, 16, 16)), r"\(N, C, H, W\)"),
        (np.zeros((2, 1, 16, 16), np.uint8), "float"),
    ],
)
def test_tokens_reject_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        C.make_tokens(images, "raster")


def test_tokens_reject_bad_paradigm_and_mode():
    images = np.zeros((1, 1, 8, 8))
    with pytest.raises(ValueError, match="paradigm"):
        C.make_tokens(images, "zigzag")
    with pytest.raises(ValueError, match="mode"):
        C.make_tokens(images, "raster", "cumulative")


# --------------------------------------------------------------------------------------------
# Held-out R²
# --------------------------------------------------------------------------------------------

def _regression_data(seed: int, n: int = 400, predictors: int = 12, outputs: int = 5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, predictors)), rng.standard_normal((predictors, outputs)), rng


@pytest.mark.parametrize("ridge", [None, 1e-8])
def test_r2_of_an_exact_linear_function_is_one(ridge):
    x, weights, _ = _regression_data(0)
    y = x @ weights + 3.0  # with an intercept
    result = C.r2_heldout(x[:300], y[:300], x[300:], y[300:], ridge)
    assert result.average >= 0.9999 and result.pooled >= 0.9999
    assert result.num_skipped == 0


def test_r2_of_independent_noise_is_about_zero():
    x, _, rng = _regression_data(1, n=2000)
    y = rng.standard_normal((2000, 6))
    result = C.r2_heldout(x[:1500], y[:1500], x[1500:], y[1500:])
    assert result.average <= 0.05
    assert result.average > -0.05  # the chosen ridge keeps overfitting small


def test_r2_matches_least_squares_and_the_formula():
    x, weights, rng = _regression_data(2)
    y = x @ weights + 0.7 * rng.standard_normal((400, 5))
    result = C.r2_heldout(x[:300], y[:300], x[300:], y[300:], ridge=0.0)
    design = np.hstack([x[:300], np.ones((300, 1))])
    coefficients = np.linalg.lstsq(design, y[:300], rcond=None)[0]
    residual = y[300:] - np.hstack([x[300:], np.ones((100, 1))]) @ coefficients
    expected = 1 - (residual**2).sum(0) / ((y[300:] - y[300:].mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(result.per_element, expected, rtol=1e-8)
    assert result.average == pytest.approx(expected.mean(), rel=1e-8)


def test_r2_skips_constant_outputs_and_ignores_constant_predictors():
    x, weights, _ = _regression_data(3)
    y = np.hstack([x @ weights, np.zeros((400, 2))])  # two structurally-zero outputs
    x_padded = np.hstack([x, np.zeros((400, 7))])  # seven structurally-zero predictors
    result = C.r2_heldout(x_padded[:300], y[:300], x_padded[300:], y[300:], ridge=1e-8)
    assert result.num_skipped == 2
    assert np.isnan(result.per_element[-2:]).all()
    assert result.average >= 0.9999


def test_r2_rejects_mismatched_inputs():
    x, weights, _ = _regression_data(4)
    with pytest.raises(ValueError, match="2-D"):
        C.r2_heldout(x[:300, 0], x[:300], x[300:], x[300:])
    with pytest.raises(ValueError, match="same number"):
        C.r2_heldout(x[:300], x[:300], x[300:, :5], x[300:])
    with pytest.raises(ValueError, match="ridge"):
        C.r2_heldout(x[:300], x[:300], x[300:], x[300:], ridge=-1.0)


# --------------------------------------------------------------------------------------------
# Table 1 and Figure 4
# --------------------------------------------------------------------------------------------

def test_paper_table_averages_are_consistent():
    for row in C.PAPER_TABLE1.values():
        assert np.mean([row["r2_t2"], row["r2_t3"], row["r2_t4"]]) == pytest.approx(row["average"], abs=1e-3)


@pytest.fixture(scope="module")
def smooth_table():
    return C.correlation_table(_powerlaw_images(600, 16), train_fraction=0.8, seed=0)


def test_spectral_tokens_are_more_predictable_than_raster_on_smooth_images(smooth_table):
    # Measured (600 images 16x16, 1/f^1.5): raster 0.447/0.365/0.591 (average 0.468), scale
    # 0.837/0.935/0.949 (0.907), spectral 0.777/0.910/0.955 (0.881).
    assert set(smooth_table) == {"raster", "scale", "spectral", "protocol"}
    for paradigm in C.PARADIGMS:
        assert set(smooth_table[paradigm]) == {"r2_t2", "r2_t3", "r2_t4", "average"}
    assert smooth_table["spectral"]["average"] > smooth_table["raster"]["average"] + 0.15
    assert smooth_table["scale"]["average"] > smooth_table["raster"]["average"] + 0.15
    assert smooth_table["spectral"]["r2_t4"] > smooth_table["spectral"]["r2_t2"]  # coarse-to-fine
    protocol = smooth_table["protocol"]
    assert protocol["num_train"] == 480 and protocol["num_test"] == 120 and protocol["token_length"] == 256
    assert protocol["skipped_elements"]["raster"]["t2"] == 3 * 64  # outside quadrant 2


def test_correlation_table_is_deterministic(smooth_table):
    again = C.correlation_table(_powerlaw_images(600, 16), train_fraction=0.8, seed=0, paradigms=("raster",))
    assert again["raster"] == smooth_table["raster"]


def test_raster_best_predictors_sit_on_the_shared_boundary():
    """Figure 4's observation: the next raster patch leans on the border of the previous one."""
    images = _powerlaw_images(400, 16, beta=2.0, seed=5)
    counts = C.best_predictor_map(images, "raster", step=2)
    assert counts.shape == (1, 1, 16, 16)
    assert counts.sum() == 64  # one choice per element of quadrant 2
    assert counts[0, 0, :8, :8].sum() == 64  # all inside quadrant 1
    assert counts[0, 0, :8, 7].sum() >= 0.9 * 64  # ... mostly on its right-hand column
    spectral = C.best_predictor_map(images, "spectral", step=4)
    assert spectral.shape == (3, 1, 16, 16) and spectral.sum() == 256


def test_render_best_predictor_map_writes_a_png(tmp_path):
    images = _powerlaw_images(60, 8, seed=6)
    maps = {paradigm: C.best_predictor_map(images, paradigm, step=3) for paradigm in C.PARADIGMS}
    path = tmp_path / "figure4.png"
    C.render_best_predictor_map(maps, path, title="t3")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    C.render_best_predictor_map(maps["raster"], tmp_path / "single.png")
    assert (tmp_path / "single.png").stat().st_size > 0


def test_downsampling_for_the_analysis_is_a_box_average_and_never_upsamples():
    from spectralar.evaluation.correlation import downsample
    from spectralar.stages.correlation import CorrelationConfig

    images = np.random.default_rng(0).random((3, 3, 64, 64))
    boxes = images.reshape(3, 3, 32, 2, 32, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(downsample(images, 32), boxes, rtol=0, atol=1e-12)
    assert downsample(images, None) is images and downsample(images, 64) is images
    with pytest.raises(ValueError, match="correlation.resolution 128 exceeds the images' 64 x 64"):
        downsample(images, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        CorrelationConfig(resolution=12)
