"""Typed API errors, and the one place where any exception becomes a status and OpenAI's envelope.

Every client-visible message comes from a typed error whose message was written to be shown;
an unexpected exception is logged with its traceback and reported as a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

from model_runtime.errors import (
    EngineDeadError,
    InvalidRequestError,
    MediaError,
    MediaTimeoutError,
    MediaTooLargeError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
    RuntimeErrorBase,
)
from server.log import request_id_var

logger = logging.getLogger(__name__)

QUEUE_FULL_RETRY_AFTER_S = 1
UNAVAILABLE_RETRY_AFTER_S = 5


class APIError(Exception):
    """An error with a message safe to show, an HTTP status, and OpenAI's `type`/`code`."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequestError(APIError):
    """400: a value in the request is invalid."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""

    status_code = 401

    def __init__(
        self, message: str = "Missing or invalid API key (send 'Authorization: Bearer <key>')."
    ) -> None:
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(APIError):
    """404: unknown model or route."""

    status_code = 404


class MethodNotAllowedError(APIError):
    """405: the route exists, the method does not."""

    status_code = 405


class RequestTimeoutError(APIError):
    """408: the request did not arrive in time (a body sent too slowly)."""

    status_code = 408


class PayloadTooLargeError(APIError):
    """413: the body, an image or a video is over its configured limit."""

    status_code = 413


class ServiceUnavailableError(APIError):
    """503: the queue is full, the server is draining or the engine is not ready; retry later."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, code: str, retry_after_s: int = UNAVAILABLE_RETRY_AFTER_S) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class ShutdownCutError(APIError):
    """500: the server shut down before the request finished (cut at the drain deadline)."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, drain_timeout_s: float) -> None:
        super().__init__(
            f"The server is shutting down and the request did not finish within its {drain_timeout_s:g} s "
            "drain; retry it.",
            code="server_shutting_down",
        )


class InternalServerError(APIError):
    """500: something failed on our side; the message never carries internals."""

    status_code = 500
    error_type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            f"The server had an error while processing your request (request id {request_id_var.get()}).",
            code="internal_error",
        )


def from_runtime_error(exc: RuntimeErrorBase) -> APIError:
    """The engine's typed errors; their messages were written for clients."""
    if isinstance(exc, MediaTooLargeError):
        return PayloadTooLargeError(exc.message, param=exc.param, code="media_too_large")
    if isinstance(exc, PromptTooLongError):
        return BadRequestError(exc.message, param=exc.param or "messages", code="context_length_exceeded")
    if isinstance(exc, MediaTimeoutError):
        return BadRequestError(exc.message, param=exc.param, code="media_decode_timeout")
    if isinstance(exc, MediaError):
        return BadRequestError(exc.message, param=exc.param, code="invalid_media")
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(exc.message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, QueueFullError):
        return ServiceUnavailableError(
            "The server is at capacity; retry shortly.",
            code="queue_full",
            retry_after_s=QUEUE_FULL_RETRY_AFTER_S,
        )
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError("The engine is not serving requests.", code="engine_unavailable")
    if isinstance(exc, RequestFailedError):
        # The engine says its message is safe, but a 500 never explains itself: logged, not sent.
        logger.error("request failed in the engine: %s", exc.message)
        return InternalServerError()
    logger.error("unmapped engine error %s: %s", type(exc).__name__, exc.message)
    return InternalServerError()


def printable(text: str) -> str:
    """Client text safe to echo in an error message: what UTF-8 cannot encode is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def to_api_error(exc: BaseException) -> APIError:
    """Any exception -> the APIError to send; unexpected ones are logged with their traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RuntimeErrorBase):
        return from_runtime_error(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return from_validation_errors(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return _from_http_exception(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return InternalServerError()


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def from_validation_errors(errors: Sequence[Any]) -> BadRequestError:
    """Pydantic's errors -> one 400 naming the field path (`messages[0].content[1].image_url.detail`),
    with OpenAI's error code and wording for the kind of problem."""
    if not errors:
        return BadRequestError("The request is invalid.")
    # With unions pydantic reports every member; the deepest location is the most specific complaint.
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return BadRequestError("The request body is not valid JSON.", code="invalid_json")
    if not loc:
        if kind == "missing":
            return BadRequestError("A JSON request body is required.", code="missing_body")
        return BadRequestError(
            "The request body must be a JSON object (Content-Type: application/json).", code="invalid_body"
        )
    param = format_loc(loc)
    code, message = _describe(kind, err, param)
    return BadRequestError(message, param=param, code=code)


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "a boolean",
    "list": "an array",
    "dict": "an object",
    "model": "an object",
}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else "a value of another type"


def _describe(kind: str, err: Any, param: str) -> tuple[str, str]:
    """OpenAI's (code, message) for one pydantic error type."""
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "missing_required_parameter", f"Missing required parameter: '{param}'."
    if kind.endswith("_type") and kind[: -len("_type")] in _TYPE_NAMES or kind.endswith("_parsing"):
        expected = _TYPE_NAMES.get(kind.split("_")[0], "another type")
        return (
            "invalid_type",
            f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        )
    if kind == "invalid_type":  # ours (e.g. a bare image_url string), with its own message
        return "invalid_type", f"Invalid type for '{param}': {err.get('msg', '')}."
    if kind == "too_short" and ctx.get("min_length") == 1 and isinstance(value, list):
        return (
            "empty_array",
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty "
            "array instead.",
        )
    if kind == "too_long" and isinstance(value, list):
        return (
            "array_above_max_length",
            f"Invalid '{param}': array too long. Expected an array with maximum length "
            f"{ctx.get('max_length')}, but got an array with length {len(value)} instead.",
        )
    if kind in ("string_too_short", "string_too_long"):
        code = "string_below_min_length" if kind == "string_too_short" else "string_above_max_length"
        return code, f"Invalid '{param}': {err.get('msg', 'invalid length')}."
    bounds = {
        "less_than_equal": ("above_max_value", "<=", "le"),
        "less_than": ("above_max_value", "<", "lt"),
        "greater_than_equal": ("below_min_value", ">=", "ge"),
        "greater_than": ("below_min_value", ">", "gt"),
    }
    if kind in bounds:
        suffix, sign, key = bounds[kind]
        number = "integer" if isinstance(value, int) and not isinstance(value, bool) else "decimal"
        words = suffix.replace("_", " ")
        return (
            f"{number}_{suffix}",
            f"Invalid '{param}': {number} {words}. Expected a value {sign} {ctx.get(key)}, but got {value} "
            "instead.",
        )
    return "invalid_value", f"Invalid value for '{param}': {err.get('msg', 'invalid')}"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def format_loc(loc: Sequence[Any]) -> str:
    """Pydantic's location as a path: ('messages', 0, 'content', 1, 'image_url', 'image_url', 'url')
    -> 'messages[0].content[1].image_url.url'."""
    out = ""
    previous: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            # Discriminated unions repeat the tag (image_url.image_url); plain unions add a type name
            # (a builtin's, or a model class's: field names are never capitalized).
            if text == previous or text in _TYPE_TAGS or "[" in text or text[:1].isupper():
                continue
            out += f".{text}" if out else text
        previous = part
    return out


def _from_http_exception(exc: StarletteHTTPException) -> APIError:
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return NotFoundError("Not found.", code="not_found")
    if exc.status_code == 405:
        err: APIError = MethodNotAllowedError("Method not allowed.", code="method_not_allowed")
        err.headers.update(headers)
        return err
    if exc.status_code < 500:
        err = APIError(f"HTTP error {exc.status_code}.", code="http_error", headers=headers)
        err.status_code = exc.status_code
        return err
    return InternalServerError()


def route_not_found(request: Request) -> NotFoundError:
    """404 for a path no route serves. A client whose base URL lacks `/v1` (or repeats it) is told
    the base URL that works, since that is nearly always why its path is unknown."""
    path = request.url.path
    if path.startswith("/v1/v1/"):
        fixed = path[len("/v1") :]
    elif not path.startswith("/v1/"):
        fixed = "/v1" + path
    else:
        fixed = ""
    if fixed and _has_route(request, fixed):
        base = str(request.base_url).rstrip("/") + "/v1"
        return NotFoundError(
            f"Not found: {request.method} {printable(path)[:200]}. The API's base URL is {base} "
            f"(the route is {request.method} {fixed}); set your client's base_url to it.",
            code="not_found",
        )
    return NotFoundError("Not found.", code="not_found")


def _has_route(request: Request, path: str) -> bool:
    scope = {"type": "http", "path": path, "method": request.method, "root_path": ""}
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return True
    return False


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the framework catches through `to_api_error`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 404:
            return error_response(route_not_found(request))
        return error_response(to_api_error(exc))

    for exc_type in (APIError, RuntimeErrorBase, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, handle)
