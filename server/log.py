"""Logging with the request id on every line, carried by a context variable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (or "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RateLimitFilter(logging.Filter):
    """At most `burst` records of one kind (logger, level, message template) at once, refilled at
    `rate` per second; what is dropped is counted and reported with the next record that passes.

    A flood of bad requests (half-open connections, invalid HTTP) must not turn into a flood of
    log lines: 90 MB of them in 15 s fill a disk or a log pipeline long before anyone reads them.
    """

    def __init__(
        self, rate: float = 20.0, burst: float = 100.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._rate, self._burst, self._clock = rate, burst, clock
        self._buckets: dict[tuple[str, int, object], list[float]] = {}  # key -> [tokens, last, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.msg)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 10_000:  # messages built without a template: keep this bounded
                self._buckets.clear()
            bucket = self._buckets[key] = [self._burst, now, 0]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            bucket[2] += 1
            return False
        bucket[0] = tokens - 1
        if bucket[2]:
            record.msg = f"{record.msg} [{int(bucket[2])} similar messages suppressed]"
            bucket[2] = 0
        return True


def configure_logging(level: str) -> None:
    """Route the root logger (uvicorn's loggers propagate to it) through one request-id-aware handler."""
    handler = logging.StreamHandler()
    handler.addFilter(RateLimitFilter())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # uvicorn's extra "trace" level is below debug; the stdlib does not know its name.
    root.setLevel(logging.DEBUG if level == "trace" else level.upper())
    # httpx logs every fetched media URL at INFO, query string (and any token in it) included.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
