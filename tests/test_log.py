"""The one progress helper: a tqdm bar on a terminal; in a log, lines with position, elapsed time,
rate and time left, the first after the first item, then every N items or every T seconds."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from spectralar.log import format_duration, progress

LINE = re.compile(r"^(?P<desc>\S+) (?P<count>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\) elapsed (?P<elapsed>[\d:]+), "
                  r"(?P<rate>[\d.e+]+) step/s, ETA (?P<eta>[\d:]+)")


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spectralar"]


def test_log_lines_carry_position_elapsed_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    caplog.set_level(logging.INFO, logger="spectralar")
    clock = FakeClock()
    bar = progress(range(100, 500), total=500, initial=100, desc="train", log_every=100, unit="step",
                   every_seconds=1e9, clock=clock)
    for _ in bar:
        clock.now += 0.5  # 2 steps per second
    lines = _lines(caplog)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    # resumed at 100: the first line after the first step of this run, then every 100 steps
    assert [int(m["count"]) for m in parsed] == [101, 200, 300, 400, 500]
    assert {m["total"] for m in parsed} == {"500"}
    first, middle, last = parsed[0], parsed[2], parsed[-1]
    assert first["elapsed"] == "0:00" and float(first["rate"]) == pytest.approx(2.0)
    assert first["eta"] == format_duration(399 / 2)  # 3:20 left at 2 steps/s
    assert middle["percent"] == "60" and middle["elapsed"] == "1:40" and middle["eta"] == "1:40"
    assert last["eta"] == "0:00" and last["elapsed"] == "3:20"


def test_a_slow_loop_logs_every_few_seconds_not_only_every_n_steps(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="spectralar")
    clock = FakeClock()
    for _ in progress(range(10), desc="slow", log_every=1000, unit="step", every_seconds=30, clock=clock, total=10):
        clock.now += 12.0  # a step every 12 s: log_every alone would stay silent for 3 hours
    counts = [int(LINE.match(line)["count"]) for line in _lines(caplog)]
    assert counts == [1, 4, 7, 10]  # the first step (t = 12 s), then whenever 30 s have passed since the last line


def test_postfix_values_are_read_when_a_line_is_written(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="spectralar")
    bar = progress(range(2), desc="fit", log_every=2, unit="step")
    for step in bar:
        bar.set_postfix(loss=torch.tensor(0.123456 + step), lr=2e-4)
    lines = _lines(caplog)
    assert lines[0].endswith("loss=0.1235 lr=0.0002") and lines[1].endswith("loss=1.123 lr=0.0002")


def test_a_log_stream_gets_no_bar_and_a_terminal_gets_tqdm(monkeypatch, caplog):
    log_stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log_stream)
    caplog.set_level(logging.INFO, logger="spectralar")
    logger = logging.getLogger("spectralar")
    # only this handler: a CLI test earlier in the session may have installed setup_logging's own
    # handler (it writes to whatever sys.stderr is, i.e. this stream too, and would double every line)
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [logging.StreamHandler(log_stream)], False
    try:
        assert list(progress(range(5), desc="loop", log_every=2)) == list(range(5))
    finally:
        logger.handlers, logger.propagate = saved
    written = log_stream.getvalue()
    assert written.count("\n") == 4  # items 1, 2, 4, 5: one complete line each
    assert "\r" not in written and "\x1b" not in written and "█" not in written and "|" not in written

    caplog.clear()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(range(5), desc="loop", log_every=2)
    for _ in bar:
        bar.set_postfix(loss=0.5)
    shown = terminal.getvalue()
    assert "\r" in shown and "loop" in shown and "5/5" in shown and "loss=0.5" in shown  # tqdm's bar
    assert not _lines(caplog)  # and no log lines beside it


def test_disabled_progress_is_silent_and_bad_settings_are_refused(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", Terminal())
    caplog.set_level(logging.INFO, logger="spectralar")
    assert list(progress(iter("abc"), enabled=False)) == ["a", "b", "c"]
    assert sys.stderr.getvalue() == "" and not _lines(caplog)
    with pytest.raises(ValueError, match="log_every"):
        progress(range(3), log_every=0)
    with pytest.raises(ValueError, match="every_seconds"):
        progress(range(3), every_seconds=0)
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"
