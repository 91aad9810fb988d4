"""Repeated warnings, rate-limited: a node that cannot reach its coordinator retries every few seconds on several
calls at once, and one line per retry buries everything else in the log."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable


class RateLimited:
    """Logs through ``logger`` at most once per ``every_s`` seconds per ``key``; the line after a quiet spell says
    how many were held back. Thread-safe; ``clock``: seconds, monotonic."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every_s`` ago; True when it was logged."""
        now = self.clock()
        with self._lock:
            if now - self._last.get(key, -float("inf")) < self.every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            msg += f" ({held} more like it in the last {self.every_s:.0f} s not shown)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
