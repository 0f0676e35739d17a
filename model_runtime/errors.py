"""Typed errors raised by the model runtime; the server maps each to an HTTP status once."""

from __future__ import annotations

import traceback


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on purpose; `message` is safe to show a client."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code  # OpenAI's error code word, where one fits better than the default


class InvalidRequestError(RuntimeErrorBase):
    """A request value is invalid (HTTP 400)."""


class MediaError(InvalidRequestError):
    """An image or video could not be decoded or is not supported (HTTP 400)."""


class MediaTimeoutError(MediaError):
    """Decoding one image or video took longer than the per-item limit: a format slow to decode (HTTP 400)."""


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


def release_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames an exception's traceback holds, through its
    whole chain of causes.

    A refused request's pixel tensors are locals of the frames that raised: the exception reaches
    the client as a 4xx, but its traceback (often part of a reference cycle through a future)
    would keep them alive until a full garbage collection happens to run. The traceback's lines
    stay printable.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def detached(exc: BaseException) -> BaseException:
    """`exc` made fit to hand to another thread from the frame that caught it: the finished frames'
    locals released, and the catching frame itself (still running, so not clearable, and holding
    the future the exception goes into: a cycle) left out of the traceback."""
    release_frames(exc)
    if exc.__traceback__ is not None:
        exc.__traceback__ = exc.__traceback__.tb_next
    return exc
