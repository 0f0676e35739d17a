"""The contract between the HTTP server and the engine: what `server/` may call.

The real implementation is `model_runtime.worker.Worker`; tests use fakes that honour the same
contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from model_runtime.request import ChatInput, EngineStats, RequestOutput
from model_runtime.sampling_params import SamplingParams

HealthState = Literal["starting", "ready", "dead"]


@dataclass(frozen=True)
class ModelInfo:
    """What the server advertises about the served model."""

    max_model_len: int
    max_tiles_per_image: int
    default_tiles_per_image: int
    default_frames_per_video: int
    template: str
    tool_format: str = "hermes"  # how the model writes tool calls (inputs/tools.py)
    # Tokens per prefix-cache block (a prompt's full blocks are cached as computed); 0 = no cache.
    cache_block_size: int = 0


class EngineClient(Protocol):
    """Async face of the engine.

    `generate` is an async generator: errors about the request itself (InvalidRequestError,
    MediaError, MediaTooLargeError, PromptTooLongError, QueueFullError, EngineDeadError) are raised
    when the first item is awaited, before any output; a failure later in serving arrives as a
    final `RequestOutput` with `error` set (a RequestFailedError) and `finished=True`.
    Closing the generator early (client gone) aborts the request and frees its memory. Requests
    share cached images and prompt prefixes only when their `cache_salt` is equal.
    """

    info: ModelInfo

    @property
    def health(self) -> HealthState: ...

    def stats(self) -> EngineStats: ...

    def generate(
        self, request_id: str, chat: ChatInput, params: SamplingParams, *, cache_salt: str = ""
    ) -> AsyncIterator[RequestOutput]: ...

    async def tokenize(self, chat: ChatInput) -> list[int]:
        """The prompt's token ids exactly as `generate` would build them (template, image and video
        tokens, or a completions prompt as is); the same errors as `generate`'s first await."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included; InvalidRequestError for an id the
        tokenizer does not know."""
        ...

    async def abort(self, request_id: str, error: Exception | None = None) -> None:
        """Stop the request; with `error`, its stream ends at once with a final output carrying it."""
        ...
