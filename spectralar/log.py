"""Logging set-up and progress reporting for long loops.

A progress bar when a person watches (stderr is a TTY); otherwise one log line every N steps, so
DVC/Snakemake/SLURM logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
LOGGER_NAME = "spectralar"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (as logging's own last-resort handler
    does), so a handler made once never writes to a stream that was swapped out and closed."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO, log_file: Optional[str] = None) -> None:
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(level)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = _CurrentStderr()
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def progress(
    iterable: Iterable[T],
    *,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    log_every: int = 100,
    logger: Optional[logging.Logger] = None,
) -> Iterator[T]:
    """Iterate with a tqdm bar on a TTY, else a log line every ``log_every`` items (with rate)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    logger = logger or get_logger()
    start = time.perf_counter()
    count = 0
    for count, item in enumerate(iterable, start=1):
        yield item
        if count % log_every == 0 or (total is not None and count == total):
            elapsed = time.perf_counter() - start
            of = f"/{total}" if total is not None else ""
            logger.info("%s %d%s %s (%.1f %s/s)", desc, count, of, unit, count / max(elapsed, 1e-9), unit)
