"""Pure ASGI middleware: request id, draining, API keys and the body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Callable, Iterable

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
    error_response,
    to_api_error,
)
from server.log import request_id_var

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# A client-sent id is echoed only when harmless in logs; it never becomes the engine's id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestContextMiddleware:
    """Outermost: gives each request an id (response header, every log line) and turns anything
    unhandled into a generic 500 without internals."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _CLIENT_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            err = to_api_error(exc)  # logs the traceback with the request id
            if started:
                logger.error("error after the response started; closing the connection")
                return
            await error_response(err)(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class DrainMiddleware:
    """While draining (SIGTERM), new requests get 503 + Retry-After; /health reports it itself."""

    def __init__(self, app: ASGIApp, *, is_draining: Callable[[], bool], exempt: Iterable[str]) -> None:
        self.app = app
        self._is_draining = is_draining
        self._exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._is_draining() and scope["path"] not in self._exempt:
            err = ServiceUnavailableError(
                "The server is shutting down; retry on another instance.", code="draining"
            )
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but the public ones, compared in constant time."""

    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str], public_paths: Iterable[str]) -> None:
        self.app = app
        self._keys = [k.encode("utf-8") for k in api_keys]
        self._public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._keys
            or scope["path"] in self._public
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        await error_response(AuthenticationError())(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        # Compare against every key (no early exit), so timing does not tell which key nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched


class BodyLimitMiddleware:
    """413 before reading a body over `max_bytes`: Content-Length first, then counted while read.

    The body is read here (bounded) and replayed to the app, so the app never sees a partial body.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self._max = max_bytes
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(
            f"The request body is larger than the {self._max}-byte limit.", code="body_too_large"
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            await error_response(too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        # A body trickled in slowly holds a connection and a task: it must all arrive in time.
        with anyio.move_on_after(self._timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before sending its body: nothing to answer
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._max:
                    await error_response(too_large)(scope, receive, send)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            late = RequestTimeoutError(
                f"The request body did not arrive within {self._timeout_s:g} s.", code="body_timeout"
            )
            await error_response(late)(scope, receive, send)
            return
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message = {"type": "http.request", "body": body, "more_body": False}
                body = None
                return message
            return await receive()  # afterwards: only http.disconnect, which the app may wait for

        await self.app(scope, replay, send)
