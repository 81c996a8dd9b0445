"""Token-frequency schedules ω_1 < … < ω_N = H: which DCT block each token prefix reconstructs.

Token ``s_i`` (1-based) is trained to complete the band-limited image with the top-left ω_i block of
the spectrum (eq. 5-6), so the schedule must be strictly increasing (nesting) and end at the image
size (the full prefix reconstructs the whole image).
"""
from __future__ import annotations

from typing import Literal

ScheduleKind = Literal["uniform", "nonuniform"]


def frequency_schedule(num_tokens: int, size: int, kind: ScheduleKind) -> tuple[int, ...]:
    """Spectral levels ``(ω_1, …, ω_N)`` for ``N = num_tokens`` tokens and images of side ``size``.

    ``uniform`` (the paper's ablation): ``ω_i = round(i·H/N)``, rounded half up in exact integer
    arithmetic; needs ``N ≤ H``.

    ``nonuniform`` generalises eq. 9 (stated only for N = 64, H = 256) with its three segments:
    the first ``n1 = N//2`` tokens step by 1 (``ω = 1…n1``), the next ``n2 = N//4`` step by 2, and
    the remaining ``n3 = N − n1 − n2`` tokens share the rest of the spectrum evenly,
    ``ω_{n1+n2+k} = ω_{n1+n2} + round(k·(H − ω_{n1+n2})/n3)``. For N = 64, H = 256 this is exactly
    eq. 9 (ω_32 = 32, ω_48 = 64, then steps of 12 to 256). It is strictly increasing iff
    ``H − ω_{n1+n2} ≥ n3``, i.e. ``H ≥ N + N//4``; otherwise a ValueError is raised.
    Eq. 7 (non-decreasing gaps) holds whenever ``(H − ω_{n1+n2})/n3`` is an integer ≥ 2 (e.g. N and
    H powers of two with H ≥ 2N); otherwise it can fail: the last segment's gaps alternate by one
    after rounding, or its step is below the middle segment's 2.
    """
    _check_positive_int(num_tokens, "num_tokens")
    _check_positive_int(size, "size")
    if kind == "uniform":
        return _uniform(num_tokens, size)
    if kind == "nonuniform":
        return _nonuniform(num_tokens, size)
    raise ValueError(f"kind must be 'uniform' or 'nonuniform', got {kind!r}")


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _round_ratio(numerator: int, denominator: int) -> int:
    """``round(numerator/denominator)`` half up, exactly (no float error for large sizes)."""
    return (2 * numerator + denominator) // (2 * denominator)


def _uniform(num_tokens: int, size: int) -> tuple[int, ...]:
    if num_tokens > size:
        raise ValueError(
            f"uniform schedule needs num_tokens <= size for strictly increasing levels, "
            f"got num_tokens={num_tokens}, size={size}"
        )
    return tuple(_round_ratio(i * size, num_tokens) for i in range(1, num_tokens + 1))


def _nonuniform(num_tokens: int, size: int) -> tuple[int, ...]:
    fine_count = num_tokens // 2  # eq. 9: ω_i = i for i ≤ 32
    medium_count = num_tokens // 4  # eq. 9: ω_i = 2i − 32 for 32 < i ≤ 48
    coarse_count = num_tokens - fine_count - medium_count  # eq. 9: ω_i = 12i − 512 for i > 48
    fine = list(range(1, fine_count + 1))
    medium = [fine_count + 2 * j for j in range(1, medium_count + 1)]
    start = fine_count + 2 * medium_count  # ω_{n1+n2}, or 0 when there are no earlier tokens
    remaining = size - start
    if remaining < coarse_count:
        raise ValueError(
            f"nonuniform schedule cannot be strictly increasing for num_tokens={num_tokens}, "
            f"size={size} (needs size >= num_tokens + num_tokens//4 = "
            f"{num_tokens + num_tokens // 4}); use kind='uniform' or a smaller num_tokens"
        )
    coarse = [start + _round_ratio(k * remaining, coarse_count) for k in range(1, coarse_count + 1)]
    return tuple(fine + medium + coarse)
