"""Progress of long loops: a tqdm bar in a terminal, periodic log lines elsewhere.

A bar redrawn with ``\\r`` turns into one endless line in a log file, and tqdm's
``disable=None`` hides it there altogether. When stderr is not a terminal (piped to a file,
``dvc repro``, CI) `progress` logs ``desc: done/total unit (pct%) rate, ETA`` every
``every_percent`` percent or ``every_seconds`` seconds instead, and once at the end.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Self

_logger = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether progress bars can be drawn: stderr is a terminal, or a Jupyter kernel runs."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, leave: bool = True,
             logger: logging.Logger | None = None, every_percent: float = 10.0,
             every_seconds: float = 30.0) -> Any:
    """A tqdm bar (terminal) or a `LogProgress` (otherwise) over ``iterable``, or a manual
    counter (``update(n)``, ``close()``) when ``iterable`` is None. ``disable`` silences
    both; ``logger`` is the one whose name the log lines carry."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, disable=disable,
                       logger=logger or _logger, every_percent=every_percent,
                       every_seconds=every_seconds)


class LogProgress:
    """The tqdm calls the project uses (iteration, ``update``, ``close``,
    ``set_postfix``), reported as INFO log lines."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str,
                 disable: bool, logger: logging.Logger, every_percent: float,
                 every_seconds: float):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.logger = disable, logger
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.n, self.start = 0, time.perf_counter()
        self._last_time, self._last_n, self._closed = self.start, 0, False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; the log lines carry no postfix."""

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; log when a percent step or the time step is passed."""
        self.n += n
        if self.disable:
            return
        now = time.perf_counter()
        step = self.total * self.every_percent / 100.0 if self.total else float("inf")
        if self.n - self._last_n >= step or now - self._last_time >= self.every_seconds:
            self._report(now)

    def close(self) -> None:
        """Log the final count once (unless the last line already said it)."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n and self.n != self._last_n:
            self._report(time.perf_counter())

    def _report(self, now: float) -> None:
        self._last_time, self._last_n = now, self.n
        self.logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """``desc: done/total unit (pct%) rate unit/s, ETA hh:mm:ss`` (no total: no pct, ETA)."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{head}{self.n} {self.unit} {rate:.2f} {self.unit}/s"
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        return (f"{head}{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
                f" {rate:.2f} {self.unit}/s, ETA {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
