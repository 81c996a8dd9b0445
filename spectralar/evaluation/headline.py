"""The headline metrics of a run (paper Table 2), in the order every table lists them.

evaluate writes them to ``metrics/evaluate.json`` and ``generation.csv``, report shows them beside
the paper's, and a sweep table has one column each. Kept free of torch: the Snakefile imports
``spectralar.sweep``, which reads this list.
"""

from __future__ import annotations

HEADLINE_METRICS: tuple[str, ...] = (
    "fid", "inception_score", "kid", "precision", "recall", "class_accuracy", "rfid",
)
