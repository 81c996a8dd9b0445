"""Orthonormal 2D DCT-II and band-limited (low-passed) targets, paper §3.1 and eq. 5.

The transform is written as two matrix products, ``D = C_H · X · C_Wᵀ``, rather than through
an FFT: the matrices are tiny for the image sizes used here (≤ 256), matrix products run on any
device and dtype, are differentiable for free, and batch over every leading dimension.

Index convention. Tensors are ``(..., H, W)``: the row index runs over ``y`` (height) and the
column index over ``x`` (width). The paper's ``F(u, v)`` in eq. 2 has ``u`` along ``x`` and ``v``
along ``y``, so ``F(u, v)`` lives at ``D[..., v, u]``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Union

import torch
from torch import Tensor

DeviceLike = Union[torch.device, str, None]

# Below 32 bits the 256-term sums of the DCT lose too much precision for reconstruction targets,
# so half-precision inputs are transformed in float32 and cast back.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# DCT basis
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _dct_matrix_float64_cpu(n: int) -> Tensor:
    """The exact basis in float64 on the CPU; every other dtype/device is cast from this one.

    Built outside inference mode so that a first call made under ``torch.inference_mode()``
    cannot cache an inference tensor that later training code would fail to save for backward.
    """
    with torch.inference_mode(False):
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # (n, 1) frequency
        x = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # (1, n) position
        # Eq. 2 factorises into 1D factors sqrt(2/n) · C(k) · cos((2x+1)kπ / 2n).
        basis_nn = math.sqrt(2.0 / n) * torch.cos((2.0 * x + 1.0) * k * math.pi / (2.0 * n))
        basis_nn[0] /= math.sqrt(2.0)  # C(0) = 1/√2 makes the rows orthonormal
        return basis_nn


@functools.lru_cache(maxsize=64)
def _cached_dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Cast copy per (n, dtype, device), so repeated training steps skip the host-to-device copy."""
    with torch.inference_mode(False):
        return _dct_matrix_float64_cpu(n).to(dtype=dtype, device=device)


def _normalise_device(device: DeviceLike) -> torch.device:
    """Give CUDA devices an explicit index so ``cuda`` and ``cuda:0`` share one cache entry."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: DeviceLike = None) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` (n, n), ``C[k, x] = √(2/n)·C(k)·cos((2x+1)kπ/2n)``.

    Row ``k`` is the 1D factor of the paper's basis function (eq. 2), so ``C @ f`` is the 1D DCT-II
    of ``f`` and ``C.T`` is its inverse (``C @ C.T = I``). Computed in float64 then cast.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    # A clone, so a caller that edits the result in place cannot corrupt the cache.
    return _cached_dct_matrix(n, dtype, _normalise_device(device)).clone()


# --------------------------------------------------------------------------------------------
# 2D transform
# --------------------------------------------------------------------------------------------

def _check_image_tensor(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32/float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W), got {tuple(x.shape)}")


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off, so the maths inside stays in its input dtype under mixed precision: the DCT
    here, and the quantisers' distances (TiTok quantises in float32: low-precision distances pick wrong
    codes among thousands of close ones). Devices without autocast (the meta device used for shape
    checks) get a no-op context."""
    # CPU and CUDA without asking: torch.compile cannot trace torch.amp.is_autocast_available in torch
    # 2.11 (a graph break in the compiled tokenizer forward); torch 2.14 can
    if device.type in ("cpu", "cuda") or torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _separable_transform(x: Tensor, *, inverse: bool) -> Tensor:
    """``C_H · X · C_Wᵀ`` (forward) or ``C_Hᵀ · X · C_W`` (inverse) over the last two dims."""
    out_dtype = x.dtype
    work_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    height, width = x.shape[-2], x.shape[-1]
    basis_HH = _cached_dct_matrix(height, work_dtype, x.device)
    basis_WW = _cached_dct_matrix(width, work_dtype, x.device)
    if inverse:
        basis_HH, basis_WW = basis_HH.T, basis_WW.T
    # Autocast would run these sums in half precision; reconstruction targets need full precision.
    with float32_region(x.device):
        x = x.to(work_dtype)
        out = torch.matmul(basis_HH, x)  # (..., H, W) transform along H
        out = torch.matmul(out, basis_WW.T)  # (..., H, W) transform along W
    return out.to(out_dtype)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2D DCT-II over the last two dims of ``x`` (..., H, W), eq. 1-2.

    Equals ``scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")``. Any H, W; differentiable.
    """
    _check_image_tensor(x, "x")
    return _separable_transform(x, inverse=False)


def idct2(coefficients: Tensor) -> Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III) over the last two dims (..., H, W)."""
    _check_image_tensor(coefficients, "coefficients")
    return _separable_transform(coefficients, inverse=True)


# --------------------------------------------------------------------------------------------
# Band limiting (eq. 5)
# --------------------------------------------------------------------------------------------

def _check_omegas(omegas: Tensor, height: int) -> None:
    if not isinstance(omegas, Tensor):
        raise ValueError(f"omegas must be a torch.Tensor, got {type(omegas).__name__}")
    if omegas.dim() != 1:
        raise ValueError(f"omegas must have shape (B,), got {tuple(omegas.shape)}")
    if omegas.is_floating_point() or omegas.is_complex() or omegas.dtype == torch.bool:
        raise ValueError(f"omegas must be an integer tensor, got {omegas.dtype}")
    if omegas.numel() and (int(omegas.min()) < 1 or int(omegas.max()) > height):
        raise ValueError(
            f"omegas must lie in [1, height={height}], got min {int(omegas.min())}, "
            f"max {int(omegas.max())}"
        )


def lowpass_mask(
    omegas: Tensor, height: int, width: int, *, device: DeviceLike = None
) -> Tensor:
    """Boolean ``1_ω`` of eq. 5 per sample: ``(B, 1, H, W)``, True on the kept low frequencies.

    Keeps rows ``r < ω`` and columns ``c < ceil(ω·W/H)``: for square images this is exactly the
    paper's top-left ω×ω block; for ``W ≠ H`` the block keeps the image's aspect ratio, so the same
    ω cuts the same relative frequency along both axes and ``ω = H`` keeps everything.
    ``device`` defaults to the device of ``omegas``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")
    _check_omegas(omegas, height)
    device = omegas.device if device is None else torch.device(device)
    omegas_B = omegas.to(device=device, dtype=torch.long)  # (B,)
    columns_B = (omegas_B * width + height - 1) // height  # (B,) exact integer ceil(ω·W/H)
    rows_H = torch.arange(height, device=device)  # (H,)
    cols_W = torch.arange(width, device=device)  # (W,)
    keep_rows_BH1 = rows_H[None, :, None] < omegas_B[:, None, None]  # (B, H, 1)
    keep_cols_B1W = cols_W[None, None, :] < columns_B[:, None, None]  # (B, 1, W)
    return (keep_rows_BH1 & keep_cols_B1W).unsqueeze(1)  # (B, 1, H, W)


def band_limit(images: Tensor, omegas: Union[Tensor, int]) -> Tensor:
    """Band-limited targets ``I'_i = IDCT(DCT(I) ∘ 1_{ω_i})`` of eq. 5 / Alg. 1 line 6.

    ``images`` is ``(B, C, H, W)``; ``omegas`` is a ``(B,)`` integer tensor (one ω per sample, as in
    nested training where each sample draws its own prefix length) or a python int for all samples.
    Each channel is filtered independently. Vectorised over the batch; dtype is preserved.
    """
    _check_image_tensor(images, "images")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    omegas = _omegas_tensor(omegas, batch, height)
    mask_B1HW = lowpass_mask(omegas, height, width, device=images.device)
    coefficients_BCHW = dct2(images)  # (B, C, H, W)
    # Multiplying (rather than torch.where) keeps the op a plain linear projection for autograd.
    kept_BCHW = coefficients_BCHW * mask_B1HW.to(coefficients_BCHW.dtype)  # (B, C, H, W)
    return idct2(kept_BCHW)  # (B, C, H, W)


def _omegas_tensor(omegas: Union[Tensor, int], batch: int, height: int) -> Tensor:
    """Broadcast a python-int ω to ``(B,)`` and check that a tensor ω matches the batch."""
    if isinstance(omegas, bool):
        raise ValueError(f"omegas must be an int or an integer tensor, got {omegas!r}")
    if isinstance(omegas, int):
        if not 1 <= omegas <= height:
            raise ValueError(f"omegas must lie in [1, height={height}], got {omegas}")
        return torch.full((batch,), omegas, dtype=torch.long)
    if isinstance(omegas, Tensor) and omegas.dim() == 1 and omegas.shape[0] != batch:
        raise ValueError(f"omegas must have shape (B,)=({batch},), got {tuple(omegas.shape)}")
    return omegas
