"""Tests for spectralar.spectral: DCT against scipy and eq. 2, band limiting (eq. 5), schedules (eq. 9)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from spectralar.spectral import (
    band_limit,
    dct2,
    dct_matrix,
    frequency_schedule,
    idct2,
    lowpass_mask,
)
from spectralar.spectral import dct as dct_module

SHAPES = [(1, 1, 7, 5), (2, 3, 8, 8), (3, 16, 9), (1, 3, 32, 32)]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _scipy_band_limit(images: np.ndarray, omegas: list[int]) -> np.ndarray:
    """Independent reference for eq. 5: scipy DCT, zero outside the kept block, scipy inverse."""
    height, width = images.shape[-2:]
    out = np.empty_like(images)
    for i, omega in enumerate(omegas):
        spectrum = scipy.fft.dctn(images[i], axes=(-2, -1), norm="ortho")
        spectrum[..., omega:, :] = 0.0
        spectrum[..., :, math.ceil(omega * width / height):] = 0.0
        out[i] = scipy.fft.idctn(spectrum, axes=(-2, -1), norm="ortho")
    return out


# ----------------------------------------------------------------------------------------------
# DCT
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dct2_and_idct2_match_scipy(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _random(shape, dtype)
    x_np = x.double().numpy()  # the reference always runs in float64
    expected_dct = scipy.fft.dctn(x_np, axes=(-2, -1), norm="ortho")
    expected_idct = scipy.fft.idctn(x_np, axes=(-2, -1), norm="ortho")
    got_dct, got_idct = dct2(x), idct2(x)
    assert got_dct.dtype == dtype and got_dct.shape == x.shape
    assert got_idct.dtype == dtype and got_idct.shape == x.shape
    assert np.abs(got_dct.double().numpy() - expected_dct).max() <= TOLERANCE[dtype]
    assert np.abs(got_idct.double().numpy() - expected_idct).max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_parseval(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _random(shape, dtype, seed=1)
    coefficients = dct2(x)
    torch.testing.assert_close(idct2(coefficients), x, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(dct2(idct2(x)), x, atol=TOLERANCE[dtype], rtol=0)
    # Orthonormality: the energy per (H, W) slice is preserved.
    energy_in = x.double().pow(2).sum(dim=(-2, -1))
    energy_out = coefficients.double().pow(2).sum(dim=(-2, -1))
    torch.testing.assert_close(energy_out, energy_in, rtol=10 * TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_dct_matrix_is_orthonormal(n: int) -> None:
    basis = dct_matrix(n, dtype=torch.float64)
    assert basis.shape == (n, n) and basis.dtype == torch.float64
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64), atol=1e-13, rtol=0)
    assert dct_matrix(n).dtype == torch.float32


def test_dct_matrix_result_is_not_the_cache() -> None:
    dct_matrix(6).zero_()
    assert dct_matrix(6).abs().sum() > 0
    x = _random((6, 6), torch.float64)
    torch.testing.assert_close(dct2(x).numpy(), scipy.fft.dctn(x.numpy(), norm="ortho"))


def _eq2_basis_image(u: int, v: int, height: int, width: int) -> np.ndarray:
    """g_{u,v}(x, y) of eq. 2, written out with numpy; array indexed [y, x]."""
    c_u = 1 / math.sqrt(2) if u == 0 else 1.0
    c_v = 1 / math.sqrt(2) if v == 0 else 1.0
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return (
        2 * c_u * c_v / math.sqrt(height * width)
        * np.cos((2 * x + 1) * u * math.pi / (2 * width))
        * np.cos((2 * y + 1) * v * math.pi / (2 * height))
    )


@pytest.mark.parametrize("u, v", [(0, 0), (1, 0), (0, 2), (4, 5), (3, 1)])
def test_dct_of_eq2_basis_function_is_one_hot(u: int, v: int) -> None:
    height, width = 6, 5  # non-square so that swapping u and v would be caught
    basis_image = torch.from_numpy(_eq2_basis_image(u, v, height, width))  # (H, W)
    one_hot = torch.zeros(height, width, dtype=torch.float64)
    one_hot[v, u] = 1.0  # u runs along x (columns), v along y (rows)
    torch.testing.assert_close(dct2(basis_image), one_hot, atol=1e-12, rtol=0)
    torch.testing.assert_close(idct2(one_hot), basis_image, atol=1e-12, rtol=0)


def test_gradcheck_dct2_idct2() -> None:
    x = _random((2, 3, 4), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(dct2, (x,))
    assert torch.autograd.gradcheck(idct2, (x,))


@pytest.mark.parametrize(
    "bad",
    [torch.arange(12).reshape(3, 4), torch.zeros(5), torch.zeros(2, 2, dtype=torch.complex64), "image"],
)
def test_dct2_rejects_bad_input(bad: object) -> None:
    with pytest.raises(ValueError, match="x must"):
        dct2(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coefficients must"):
        idct2(bad)  # type: ignore[arg-type]


def test_dct_matrix_rejects_bad_size() -> None:
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="n must"):
            dct_matrix(bad)  # type: ignore[arg-type]


def test_first_call_in_inference_mode_does_not_break_later_training() -> None:
    """The basis cache must not hold inference tensors, or autograd fails to save them."""
    dct_module._dct_matrix_float64_cpu.cache_clear()
    dct_module._cached_dct_matrix.cache_clear()
    with torch.inference_mode():
        dct2(torch.zeros(1, 7, 11))
    x = _random((1, 7, 11), torch.float32).requires_grad_(True)
    dct2(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-5, rtol=0)  # orthonormal: d|Cx|²/dx = 2x


def test_low_precision_and_autocast_keep_full_precision() -> None:
    x = _random((2, 3, 16, 16), torch.float32, seed=3)
    reference = dct2(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = dct2(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, atol=1e-5, rtol=0)
    half = dct2(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=0.1, rtol=0.02)  # bf16 rounding only


# ----------------------------------------------------------------------------------------------
# Band limiting
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_band_limit_full_band_is_identity(dtype: torch.dtype) -> None:
    images = _random((3, 2, 8, 8), dtype)
    torch.testing.assert_close(band_limit(images, 8), images, atol=TOLERANCE[dtype], rtol=0)
    full = torch.full((3,), 8, dtype=torch.long)
    torch.testing.assert_close(band_limit(images, full), images, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("height, width", [(8, 8), (8, 12), (9, 6), (7, 5)])
def test_band_limit_matches_scipy_reference(height: int, width: int) -> None:
    images = _random((4, 3, height, width), torch.float64, seed=4)
    omegas = [1, 3, height - 1, height]
    got = band_limit(images, torch.tensor(omegas))
    expected = _scipy_band_limit(images.numpy(), omegas)
    assert np.abs(got.numpy() - expected).max() <= 1e-12


def test_band_limit_per_sample_equals_each_sample_alone() -> None:
    images = _random((5, 3, 16, 16), torch.float32, seed=5)
    omegas = torch.tensor([1, 4, 16, 7, 4])
    batched = band_limit(images, omegas)
    for i in range(5):
        alone = band_limit(images[i : i + 1], int(omegas[i]))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-6, rtol=0)
    # A batch is not one ω broadcast: two samples with different ω must differ from a single ω run.
    assert not torch.allclose(batched[0], band_limit(images, 4)[0], atol=1e-3)


@pytest.mark.parametrize("height, width", [(16, 16), (12, 8)])
def test_band_limit_is_nested(height: int, width: int) -> None:
    images = _random((2, 3, height, width), torch.float64, seed=6)
    for inner in (1, 3, 8, height):
        for outer in range(inner, height + 1, 3):
            twice = band_limit(band_limit(images, outer), inner)
            torch.testing.assert_close(twice, band_limit(images, inner), atol=1e-12, rtol=0)
            # Nesting the other way round is the same projection.
            torch.testing.assert_close(band_limit(band_limit(images, inner), outer), twice, atol=1e-12, rtol=0)


@pytest.mark.parametrize("height, width", [(10, 10), (10, 6), (6, 10)])
def test_band_limit_spectrum_inside_and_outside_block(height: int, width: int) -> None:
    images = _random((3, 2, height, width), torch.float64, seed=7)
    omegas = torch.tensor([1, 4, height - 1])
    spectrum_in, spectrum_out = dct2(images), dct2(band_limit(images, omegas))
    for i, omega in enumerate(omegas.tolist()):
        kept_cols = math.ceil(omega * width / height)
        inside = (slice(None), slice(0, omega), slice(0, kept_cols))
        torch.testing.assert_close(spectrum_out[i][inside], spectrum_in[i][inside], atol=1e-12, rtol=0)
        outside = spectrum_out[i].clone()
        outside[inside] = 0.0
        assert outside.abs().max() <= 1e-12


def test_lowpass_mask_shapes_and_blocks() -> None:
    omegas = torch.tensor([1, 5, 16])
    square = lowpass_mask(omegas, 16, 16, device="cpu")
    assert square.shape == (3, 1, 16, 16) and square.dtype == torch.bool
    for i, omega in enumerate(omegas.tolist()):
        expected = torch.zeros(16, 16, dtype=torch.bool)
        expected[:omega, :omega] = True  # the paper's ω×ω block 1_ω of eq. 5
        assert torch.equal(square[i, 0], expected)
    wide = lowpass_mask(torch.tensor([1, 3, 4]), 4, 10)
    assert wide[:, 0].sum(dim=(-2, -1)).tolist() == [1 * 3, 3 * 8, 4 * 10]  # ceil(ω·10/4) columns
    tall = lowpass_mask(torch.tensor([1, 9]), 9, 2)
    assert tall[:, 0].sum(dim=(-2, -1)).tolist() == [1 * 1, 9 * 2]


def test_band_limit_is_a_differentiable_symmetric_projection() -> None:
    """P = IDCT ∘ mask ∘ DCT is an orthogonal projection: <P x, y> = <x, P y>, and grads flow."""
    x = _random((2, 3, 8, 6), torch.float64, seed=8).requires_grad_(True)
    y = _random((2, 3, 8, 6), torch.float64, seed=9)
    omegas = torch.tensor([3, 5])
    left = (band_limit(x, omegas) * y).sum()
    right = (x * band_limit(y, omegas)).sum()
    torch.testing.assert_close(left, right, atol=1e-12, rtol=0)
    left.backward()
    torch.testing.assert_close(x.grad, band_limit(y, omegas), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_limit_preserves_dtype(dtype: torch.dtype) -> None:
    images = _random((2, 1, 5, 5), dtype)
    assert band_limit(images, torch.tensor([2, 3])).dtype == dtype


@pytest.mark.parametrize(
    "omegas",
    [0, 9, torch.tensor([0, 3]), torch.tensor([3, 9]), torch.tensor([2.0, 3.0]), torch.tensor([2, 3, 4]),
     torch.tensor([[2, 3]]), True],
)
def test_band_limit_rejects_bad_omegas(omegas: object) -> None:
    with pytest.raises(ValueError, match="omegas"):
        band_limit(_random((2, 1, 8, 8), torch.float32), omegas)  # type: ignore[arg-type]


def test_band_limit_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="images"):
        band_limit(torch.zeros(1, 8, 8), 2)
    with pytest.raises(ValueError, match="images"):
        band_limit(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images = _random((4, 3, 32, 24), torch.float32, seed=10)
    omegas = torch.tensor([1, 8, 17, 32])
    on_gpu = band_limit(images.cuda(), omegas.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), band_limit(images, omegas), atol=1e-5, rtol=0)
    torch.testing.assert_close(dct2(images.cuda()).cpu(), dct2(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(idct2(images.cuda().double()).cpu(), idct2(images.double()), atol=1e-12, rtol=0)
    mask = lowpass_mask(omegas, 32, 24, device="cuda")
    assert mask.device.type == "cuda"
    assert torch.equal(mask.cpu(), lowpass_mask(omegas, 32, 24))
    assert dct_matrix(8, device="cuda").device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

# Eq. 9 by hand: ω_i = i (i ≤ 32), 2i − 32 (32 < i ≤ 48), 12i − 512 (48 < i ≤ 64).
EQ9_N64_H256 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
    34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 64,
    76, 88, 100, 112, 124, 136, 148, 160, 172, 184, 196, 208, 220, 232, 244, 256,
)  # fmt: skip


def test_nonuniform_reproduces_eq9() -> None:
    assert len(EQ9_N64_H256) == 64
    assert frequency_schedule(64, 256, "nonuniform") == EQ9_N64_H256


def test_schedule_literals() -> None:
    assert frequency_schedule(16, 32, "nonuniform") == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)
    assert frequency_schedule(64, 256, "uniform") == tuple(range(4, 257, 4))
    assert frequency_schedule(16, 32, "uniform") == tuple(range(2, 33, 2))
    assert frequency_schedule(4, 10, "uniform") == (3, 5, 8, 10)  # 2.5 and 7.5 round half up
    assert frequency_schedule(3, 10, "uniform") == (3, 7, 10)
    assert frequency_schedule(4, 8, "nonuniform") == (1, 2, 4, 8)
    assert frequency_schedule(1, 28, "nonuniform") == (28,)
    assert frequency_schedule(5, 7, "nonuniform") == (1, 2, 4, 6, 7)  # size = N + N//4, the smallest valid


@pytest.mark.parametrize("kind", ["uniform", "nonuniform"])
@pytest.mark.parametrize("num_tokens", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("size", [32, 64, 256])
def test_schedule_is_strictly_increasing_and_ends_at_size(kind: str, num_tokens: int, size: int) -> None:
    needed = num_tokens if kind == "uniform" else num_tokens + num_tokens // 4
    if size < needed:
        with pytest.raises(ValueError, match="num_tokens.*size"):
            frequency_schedule(num_tokens, size, kind)  # type: ignore[arg-type]
        return
    levels = frequency_schedule(num_tokens, size, kind)  # type: ignore[arg-type]
    assert len(levels) == num_tokens and levels[-1] == size and levels[0] >= 1
    assert all(type(level) is int for level in levels)
    assert all(a < b for a, b in zip(levels, levels[1:]))
    if kind == "nonuniform":  # eq. 7: gaps never shrink (holds on this power-of-two grid)
        gaps = [b - a for a, b in zip(levels, levels[1:])]
        assert all(a <= b for a, b in zip(gaps, gaps[1:]))


def test_nonuniform_error_suggests_uniform() -> None:
    with pytest.raises(ValueError, match="num_tokens=64, size=64.*uniform"):
        frequency_schedule(64, 64, "nonuniform")
    assert frequency_schedule(64, 64, "uniform") == tuple(range(1, 65))


@pytest.mark.parametrize(
    "num_tokens, size, kind, match",
    [(0, 32, "uniform", "num_tokens"), (4, 0, "uniform", "size"), (4.0, 32, "uniform", "num_tokens"),
     (True, 32, "nonuniform", "num_tokens"), (33, 32, "uniform", "num_tokens=33"), (8, 32, "linear", "kind")],
)
def test_schedule_rejects_bad_arguments(num_tokens: object, size: object, kind: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        frequency_schedule(num_tokens, size, kind)  # type: ignore[arg-type]
