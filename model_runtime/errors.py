"""Typed errors raised by the model runtime; the server maps each to an HTTP status once."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on purpose; `message` is safe to show a client."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(RuntimeErrorBase):
    """A request value is invalid (HTTP 400)."""


class MediaError(InvalidRequestError):
    """An image or video could not be decoded or is not supported (HTTP 400)."""


class MediaTooLargeError(RuntimeErrorBase):
    """An image or video exceeds a configured size, pixel, frame or duration cap (HTTP 413)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (text plus image tokens) plus the requested output exceeds max_model_len (HTTP 400)."""


class QueueFullError(RuntimeErrorBase):
    """The engine's waiting queue is full; the client should retry later (HTTP 503 + Retry-After)."""


class EngineDeadError(RuntimeErrorBase):
    """The engine hit an unrecoverable error and no longer serves requests (HTTP 503)."""


class RequestFailedError(RuntimeErrorBase):
    """Serving one request failed inside the engine; others keep running (HTTP 500, no internals)."""


class CheckpointError(Exception):
    """A checkpoint cannot be loaded: missing file, unknown architecture/template, shape mismatch."""
