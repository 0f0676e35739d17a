"""Draining on SIGTERM: finish what is in flight, refuse what is new, cut what overstays.

From the signal on, the server keeps listening: new requests get 503 with Retry-After (so that a
client or load balancer retries elsewhere) and /health says "draining". Requests in flight may
finish until `drain_timeout_s`; those still running then are ended with an error the client can
read (an SSE error event and [DONE] on a stream, a JSON 500 otherwise), and only then does the
server close its sockets and exit.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.errors import ShutdownCutError
from server.state import ServerState

logger = logging.getLogger(__name__)

POLL_S = 0.05
CUT_GRACE_S = 2.0  # how long cut requests get to write their error before the sockets close


async def drain(state: ServerState, timeout_s: float, *, cut_grace_s: float = CUT_GRACE_S) -> None:
    """Return once every request has finished, or was cut at the deadline and had its grace."""
    state.draining = True
    chat = state.chat
    if chat.inflight:
        logger.info("draining: %d requests in flight, up to %g s", len(chat.inflight), timeout_s)
    if not await _until_idle(state, timeout_s):
        cut = await chat.cut_all(ShutdownCutError(timeout_s))
        logger.warning("drain deadline reached: %d requests cut", cut)
        await _until_idle(state, cut_grace_s)


async def _until_idle(state: ServerState, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while state.chat.inflight:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True
