"""Logging set-up and the one progress helper every long loop uses.

A person at a terminal (stderr is a TTY) gets a tqdm bar. A log file gets lines (DVC prints the
stage's stderr, Snakemake writes it to ``logs/<rule>.log``, SLURM to its output file): the first
right after the first item, so a log shows within seconds that the loop runs and how fast, then one
every ``log_every`` items or every ``every_seconds``, whichever comes first, each with the position,
the elapsed time, the rate and the time left. Progress output never changes what a loop computes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

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


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour), as tqdm shows times."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_value(value: Any) -> str:
    """A postfix value: a one-element tensor as its number, floats with 4 significant digits."""
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        value = value.item()  # reading a tensor syncs the device: done only when a line is written
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Iterates like ``iterable`` and reports as it goes: a tqdm bar on a terminal, log lines
    otherwise (see the module docstring). ``set_postfix(**values)`` adds values (loss, lr) to the
    bar, or to the next line; tensors are read only when a line is written.

    Resumed loops pass ``initial`` (the items done before): positions and the time left count
    from it, the rate only from what this run did.
    """

    def __init__(self, iterable: Iterable[T], *, total: Optional[int], desc: str, unit: str, log_every: int,
                 every_seconds: float, initial: int, enabled: bool, logger: logging.Logger,
                 clock: Callable[[], float]) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log_every, self.every_seconds, self.initial = log_every, every_seconds, initial
        self.enabled, self.logger, self.clock = enabled, logger, clock
        self.postfix: dict[str, Any] = {}
        self.count = initial
        self._bar = None

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix_text(), refresh=False)

    def _postfix_text(self) -> str:
        return " ".join(f"{key}={format_value(value)}" for key, value in self.postfix.items())

    def __iter__(self) -> Iterator[T]:
        if not self.enabled:
            yield from self.iterable
        elif sys.stderr.isatty():
            yield from self._bar_iter()
        else:
            yield from self._logged_iter()

    def _bar_iter(self) -> Iterator[T]:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log records go through tqdm.write while the bar is shown, so they do not break it.
        with logging_redirect_tqdm(loggers=[logging.getLogger(LOGGER_NAME)]):
            with tqdm(self.iterable, total=self.total, initial=self.initial, desc=self.desc, unit=self.unit,
                      dynamic_ncols=True, file=sys.stderr) as bar:
                self._bar = bar
                try:
                    for self.count, item in enumerate(bar, start=self.initial + 1):
                        yield item
                finally:
                    self._bar = None

    def _logged_iter(self) -> Iterator[T]:
        start = last = self.clock()
        for self.count, item in enumerate(self.iterable, start=self.initial + 1):
            yield item  # the caller's loop body runs here: a line reports a finished item
            now = self.clock()
            if (self.count == self.initial + 1 or self.count % self.log_every == 0 or self.count == self.total
                    or now - last >= self.every_seconds):
                self.logger.info("%s", self.format_line(now - start))
                last = now

    def format_line(self, elapsed: float) -> str:
        """``desc 30/500 (6%) elapsed 0:12, 2.50 it/s, ETA 3:08 loss=0.41``."""
        done = self.count - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            position = f"{self.count}/{self.total} ({100 * self.count // self.total}%)"
            left = format_duration((self.total - self.count) / rate) if rate > 0 else "?"
        else:
            position, left = f"{self.count}", "?"
        line = f"{self.desc} {position} elapsed {format_duration(elapsed)}, {rate:.3g} {self.unit}/s, ETA {left}"
        postfix = self._postfix_text()
        return f"{line} {postfix}" if postfix else line


def progress(
    iterable: Iterable[T],
    total: Optional[int] = None,
    desc: str = "",
    log_every: int = 100,
    *,
    unit: str = "it",
    every_seconds: float = 30.0,
    initial: int = 0,
    enabled: bool = True,
    logger: Optional[logging.Logger] = None,
    clock: Callable[[], float] = time.monotonic,
) -> Progress:
    """Wrap a long loop: ``for step in progress(range(start, steps), total=steps, initial=start, ...)``.

    ``total`` defaults to ``len(iterable)`` when it has one. Pass ``enabled=is_main`` so that only
    rank 0 of a data-parallel job reports. ``clock`` is for tests.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if every_seconds <= 0:
        raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)  # type: ignore[arg-type]
    return Progress(iterable, total=total, desc=desc, unit=unit, log_every=log_every, every_seconds=every_seconds,
                    initial=initial, enabled=enabled, logger=logger or get_logger(), clock=clock)
