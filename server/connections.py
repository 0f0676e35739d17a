"""Connection hygiene for uvicorn's h11 protocol: header deadline, connection cap, descriptor limit.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) but nothing else: a client
that connects and sends half a request line, or headers a byte at a time, holds a connection (and
a file descriptor) forever, and a thousand of them exhaust the process's descriptors. uvicorn's
`limit_concurrency` answers 503 to requests over the limit but still accepts their connections.
So we subclass its h11 protocol (the only HTTP implementation our dependencies install) with:

- a deadline for each request's headers, from the connection's start or from the end of the
  previous response: a connection that has not sent complete headers by then is closed;
- a cap on open connections: at the cap, the connection that has waited longest without sending
  a request (half-open, or idle between requests) is closed to make room; only if every open
  connection is busy with a request is the new one closed at once;
- malformed HTTP answered with OpenAI's error envelope (JSON), as every other 400.

The body's own deadline is the BodyLimitMiddleware's (server/middleware.py), which reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections import OrderedDict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# Descriptors kept back from the connection cap: log files, the model's files, media fetches.
_RESERVED_DESCRIPTORS = 128


def raise_descriptor_limit() -> int:
    """Raise the soft limit of open files to the hard limit (as vLLM does); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(requested: int, descriptor_limit: int) -> int:
    """The connection cap that fits the descriptor limit, leaving room for everything else."""
    return max(1, min(requested, descriptor_limit - _RESERVED_DESCRIPTORS))


def guarded_protocol(*, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a header deadline and a connection cap."""

    # Connections waiting for a request's headers, oldest first: the ones to close at the cap.
    waiting: OrderedDict[H11Protocol, None] = OrderedDict()

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if waiting:
                    oldest, _ = waiting.popitem(last=False)
                    oldest.transport.close()
                    logger.warning(
                        "at the limit of %d connections: closed the longest idle one", max_connections
                    )
                else:
                    logger.warning(
                        "connection refused: all %d connections are serving requests", max_connections
                    )
                    transport.abort()
                    return
            self._arm_header_deadline()

        def send_400_response(self, msg: str) -> None:
            error = {"message": msg, "type": "invalid_request_error", "param": None, "code": "invalid_http"}
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=400, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)
            waiting[self] = None

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
            waiting.pop(self, None)

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
