"""The tokenizer-quality table from metrics alone (no torch: the report stage reads it).

``spectralar.evaluation.quality`` computes the columns; this turns the metrics of ``evaluate`` (or of
the ``tokenizer-quality`` benchmark) into one row per prefix length and a few headline comparisons.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional


def quality_rows(metrics: Mapping[str, Any], codebook_size: int) -> list[dict]:
    """One row per prefix length from the metrics of ``evaluate`` (or the quality benchmark)."""
    rows = []
    for i, omega in enumerate(metrics["omegas"]):
        row = {"prefix": i + 1, "omega": omega, "bits": round((i + 1) * math.log2(codebook_size), 2),
               "psnr_vs_target": metrics["psnr_prefix"][i],
               "psnr_vs_image": metrics["psnr_prefix_vs_full_image"][i]}
        for key in ("dct_ceiling", "pca_equal_bits", "pca_components", "proxy_ceiling"):
            if metrics.get(key) is not None:
                row[key] = metrics[key][i]
        rows.append(row)
    return rows


def quality_summary(metrics: Mapping[str, Any], compare_up_to: Optional[int] = None) -> dict[str, Any]:
    """The headline comparisons: full code vs equal-bits PCA, worst gap to the DCT ceiling."""
    n = len(metrics["omegas"])
    summary: dict[str, Any] = {"psnr_full": metrics["psnr_prefix_vs_full_image"][-1]}
    if metrics.get("pca_equal_bits") is not None:
        summary["margin_over_pca_db"] = round(metrics["psnr_prefix_vs_full_image"][-1] - metrics["pca_equal_bits"][-1], 3)
    if metrics.get("dct_ceiling") is not None:
        limit = n - 1 if compare_up_to is None else compare_up_to  # I'_N is the image: no ceiling
        gaps = [metrics["dct_ceiling"][i] - metrics["psnr_prefix_vs_full_image"][i] for i in range(min(limit, n))]
        summary["max_gap_to_dct_ceiling_db"] = round(max(gaps), 3) if gaps else None
    summary["min_psnr_vs_target"] = round(min(metrics["psnr_prefix"]), 3)
    return summary
