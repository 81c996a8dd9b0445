"""Spectral core of SpectralAR: orthonormal DCT (eq. 1-2), band-limited targets (eq. 5) and
token-frequency schedules (eq. 9)."""
from __future__ import annotations

from spectralar.spectral.dct import band_limit, dct2, dct_matrix, idct2, lowpass_mask
from spectralar.spectral.schedule import ScheduleKind, frequency_schedule

__all__ = [
    "ScheduleKind",
    "band_limit",
    "dct2",
    "dct_matrix",
    "frequency_schedule",
    "idct2",
    "lowpass_mask",
]
