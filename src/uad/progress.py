"""Progress for long work that is never silent: a tqdm bar on a terminal (or in a notebook), and
one log line every few seconds otherwise (CI logs, ``nohup``, a file): what, how far, how fast,
how long still. Core library, importable by every layer (the data layer included).

    for batch in progress(loader, total=len(loader), desc="dinomaly:predict", unit="batch"):
        ...

``UAD_PROGRESS_SECONDS`` sets the interval of the log lines (default 10 s).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("uad.progress")

__all__ = ["progress", "LogProgress", "interactive"]


def interactive() -> bool:
    """A terminal or a notebook kernel: where a live bar can be drawn."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LogProgress:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``) as log lines: one at
    most every ``every`` seconds with the count, percentage, rate and ETA, and a last one when a
    loop that logged finishes."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, every: float | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = int(initial)
        self.every = float(every if every is not None else os.environ.get("UAD_PROGRESS_SECONDS", 10.0))
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.logged = False

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "LogProgress without an iterable is updated by hand"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def set_postfix(self, *args: Any, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else float("nan")
        if self.total:
            eta = (self.total - self.n) / rate if rate and rate > 0 else float("inf")
            head = f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f} %)"
            tail = f"done in {_duration(elapsed)}" if final else f"ETA {_duration(eta)}"
        else:
            head, tail = f"{self.n} {self.unit}", f"{_duration(elapsed)} so far" if not final else f"done in {_duration(elapsed)}"
        speed = f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else ""
        return ", ".join(p for p in (f"{self.desc}: {head}", speed, self.postfix, tail) if p)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.logged = True
            log.info(self._line())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.logged:  # a loop long enough to report says when it ends, a short one stays quiet
            log.info(self._line(final=True))
            self.logged = False


class _Silent(LogProgress):
    def update(self, n: int = 1) -> None:
        self.n += int(n)

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, every: float | None = None):
    """A tqdm bar where one can be drawn, :class:`LogProgress` lines elsewhere; ``enabled=False``
    is silent (the same interface, counting only)."""
    if not enabled:
        return _Silent(iterable, total, desc, unit, initial)
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)
    return LogProgress(iterable, total, desc, unit, initial, every)
