"""A thread pool that serves requests in turn, so that one request cannot take every worker.

Media work (decoding and tiling images and videos) is queued per request, a "lane": workers take
the next job from the lanes in round-robin order, and a lane never has more than `per_lane` jobs
running. A request with sixteen large images therefore waits for its own images, not everybody
else's for it; and a request that leaves has its queued jobs dropped.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from model_runtime.errors import detached


class FairExecutor:
    """Worker threads fed from per-lane queues in round-robin order."""

    def __init__(
        self,
        workers: int,
        *,
        per_lane: int,
        name: str,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.per_lane = max(1, per_lane)
        self._cond = threading.Condition()
        self._lanes: OrderedDict[str, deque[tuple[concurrent.futures.Future, Callable[..., Any], tuple]]] = (
            OrderedDict()
        )
        self._running: dict[str, int] = {}
        self._stopped = False
        self._initializer = initializer
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, lane: str, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the executor is shut down")
            self._lanes.setdefault(lane, deque()).append((future, fn, args))
            self._cond.notify()
        return future

    def cancel(self, lane: str) -> None:
        """Drop the lane's queued jobs (running ones finish; their results are not awaited)."""
        with self._cond:
            for future, _, _ in self._lanes.pop(lane, ()):
                future.cancel()

    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._lanes.values())

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            for lane in list(self._lanes):
                for future, _, _ in self._lanes.pop(lane):
                    future.cancel()
            self._cond.notify_all()

    def _take(self) -> tuple[str, concurrent.futures.Future, Callable[..., Any], tuple] | None:
        """The next job, round robin over lanes under their cap; None when shut down."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                for lane, jobs in self._lanes.items():
                    if jobs and self._running.get(lane, 0) < self.per_lane:
                        future, fn, args = jobs.popleft()
                        if not jobs:
                            del self._lanes[lane]
                        else:
                            self._lanes.move_to_end(lane)  # its next job waits for the others' turn
                        self._running[lane] = self._running.get(lane, 0) + 1
                        return lane, future, fn, args
                self._cond.wait()

    def _done(self, lane: str) -> None:
        with self._cond:
            self._running[lane] -= 1
            if not self._running[lane]:
                del self._running[lane]
            self._cond.notify_all()

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (job := self._take()) is not None:
            lane, future, fn, args = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # noqa: BLE001 - delivered to the waiter
                        future.set_exception(detached(exc))
            finally:
                self._done(lane)
