"""How late the event loop runs: the readiness signal for a server that is up but stalled.

A task sleeps a short interval and measures how much later than asked it woke. Anything that
holds the event loop (a CPU-bound call on it, a flood of connections, GIL contention) shows up as
lag; while the worst lag of the recent window exceeds the setting, /health answers 503 "lagging",
so that an orchestrator stops sending this replica traffic. A loop blocked outright cannot answer
/health at all, which a probe's timeout already reports.
"""

from __future__ import annotations

import asyncio
import collections
import time

INTERVAL_S = 0.25
WINDOW_S = 10.0


class LoopLagMonitor:
    """Samples the loop's wake-up lag every INTERVAL_S; keeps the last WINDOW_S of samples."""

    def __init__(
        self, max_lag_s: float, *, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S
    ) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._window_s = window_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, time.monotonic() - asked - self.interval_s))

    def record(self, lag_s: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, lag_s))
        while self._samples and self._samples[0][0] < now - self._window_s:
            self._samples.popleft()

    @property
    def lag_s(self) -> float:
        """The worst lag of the recent window, in seconds."""
        return max((lag for _, lag in self._samples), default=0.0)

    @property
    def lagging(self) -> bool:
        return self.lag_s > self.max_lag_s
