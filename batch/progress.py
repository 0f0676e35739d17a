"""Progress of a batch job: a bar on a terminal (rows, rows/s, tokens/s, ETA), log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from batch.jsonl import is_failure, output_tokens

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts finished rows; a tqdm bar when `stream` is a terminal, else a log line every
    `interval_s` seconds. `total` is the rows this run has to do (None when unknown)."""

    def __init__(
        self,
        total: int | None,
        *,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.total = total
        self.rows = 0
        self.failed = 0
        self.tokens = 0
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last_log = self._started
        stream = stream or sys.stderr
        self._bar: Any = None
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", file=stream, dynamic_ncols=True, smoothing=0.05)

    def update(self, record: dict[str, Any]) -> None:
        self.rows += 1
        self.failed += is_failure(record)
        self.tokens += output_tokens(record)
        now = time.monotonic()
        if self._bar is not None:
            rate = self.tokens / max(now - self._started, 1e-9)
            # The postfix first: update() redraws the bar with it.
            self._bar.set_postfix_str(f"{rate:.0f} tok/s, {self.failed} failed", refresh=False)
            self._bar.update(1)
        elif now - self._last_log >= self._interval_s:
            self._last_log = now
            logger.info("%s", self.line(now))

    def restart(self) -> None:
        """Rates count from now (after the model has loaded), rows written so far included."""
        self._started = self._last_log = time.monotonic()
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(self.rows)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._started, 1e-9)
        rate = self.rows / elapsed
        done = f"{self.rows}/{self.total}" if self.total is not None else str(self.rows)
        share = f" ({100 * self.rows / self.total:.1f}%)" if self.total else ""
        eta = ""
        if self.total is not None and rate > 0 and self.rows < self.total:
            eta = f", ETA {_duration(max(self.total - self.rows, 0) / rate)}"
        return (
            f"rows {done}{share}, {rate:.2f} rows/s, {self.tokens / elapsed:.1f} tok/s, "
            f"{self.failed} failed, elapsed {_duration(elapsed)}{eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logger.info("done: %s", self.line())
