"""Periodic progress lines from inside Beam workers (stderr), and a final count.

Beam's local runner shows nothing while a stage runs; a DoFn that handles many
elements calls :meth:`ProgressLog.update` and a line like
``[daco] embed: 1,200 images (310/s)`` appears at most every ``every`` seconds.
"""

from __future__ import annotations

import sys
import time


class ProgressLog:
    """Rate-limited progress counter printed to stderr."""

    def __init__(self, stage: str, unit: str, every: float = 5.0, total: int | None = None):
        self.stage, self.unit, self.every, self.total = stage, unit, every, total
        self.count = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Add ``n`` processed items; print a line when ``every`` seconds have passed."""
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            of = f"/{self.total:,}" if self.total else ""
            print(f"[daco] {self.stage}: {self.count:,}{of} {self.unit} ({rate:,.0f}/s)", file=sys.stderr, flush=True)
