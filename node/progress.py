"""Progress of long work (state downloads, benchmarks): a tqdm bar when stderr is a terminal, otherwise a log line at
most every ``every_s`` seconds with the share done, the rate and an ETA (journald and log files get lines, not
carriage returns). Never raises: progress must not break the work it reports."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

log = logging.getLogger("lowband.progress")
T = TypeVar("T")


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f} {unit}"
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:.0f} B"


class Progress:
    """``what``: e.g. "state download"; ``total``: the amount when done (bytes with unit "B", or items)."""

    def __init__(self, what: str, total: float, unit: str = "B", every_s: float = 5.0, tty: bool | None = None) -> None:
        self.what, self.total, self.unit, self.every_s = what, max(total, 1), unit, every_s
        self.started = time.monotonic()
        self.done = 0.0
        self._shown = self.started
        self._bar: Any = None
        if sys.stderr.isatty() if tty is None else tty:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False,
                                 file=sys.stderr)
            except Exception:  # noqa: BLE001 — no bar: lines instead
                self._bar = None

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        speed = f"{_amount(rate, self.unit)}/s" if self.unit == "B" else f"{rate * 60:.1f} {self.unit}/min"
        return (f"{self.what}: {_amount(self.done, self.unit)} of {_amount(self.total, self.unit)} "
                f"({100 * self.done / self.total:.0f}%), {speed}, eta {eta}")

    def update(self, done: float) -> None:
        """The amount done so far (absolute)."""
        try:
            step, self.done = done - self.done, done
            if self._bar is not None:
                self._bar.update(step)
                return
            now = time.monotonic()
            if now - self._shown >= self.every_s and done < self.total:
                self._shown = now
                log.info("%s", self.line(now))
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_iter(items: Iterable[T], what: str, total: int | None = None, unit: str = "runs") -> Iterator[T]:
    """``items``, with a line (or bar) before each one after the first: how many are done, and an ETA."""
    seq = list(items) if total is None else items
    count = len(seq) if total is None else total  # type: ignore[arg-type]
    p = Progress(what, count, unit=unit, every_s=0.0)
    try:
        for i, item in enumerate(seq):
            if i and p._bar is None:
                p.done = i
                log.info("%s", p.line())
            elif i:
                p.update(i)
            yield item
        p.update(count)
    finally:
        p.close()
