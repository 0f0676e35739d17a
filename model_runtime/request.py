"""The runtime's request vocabulary: chat input with media, sampling, and streamed outputs.

The server turns an OpenAI request into a `ChatInput` + `SamplingParams`; the worker streams
`RequestOutput`s back. Nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ImageInput:
    """One image as undecoded bytes plus its per-image tiling limit (None: the model's default)."""

    data: bytes
    max_tiles: int | None = None


@dataclass(frozen=True)
class VideoInput:
    """One video as undecoded bytes; frames sampled as the reference `load_video` does."""

    data: bytes
    num_frames: int | None = None
    max_tiles_per_frame: int | None = None
    bound: tuple[float, float] | None = None


Part = str | ImageInput | VideoInput


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is its arguments' JSON schema (None: any object)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False
    raw: dict[str, Any] | None = None  # the function object as the client sent it (key order kept)


@dataclass(frozen=True)
class Message:
    """One chat message; `parts` keep the client's order (text, images and videos). Assistant
    messages may carry the tool calls they made; a "tool" message is one call's result."""

    role: Literal["system", "user", "assistant", "tool"]
    parts: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class OutputFormat:
    """What the answer must be: any JSON object, or JSON valid against `schema` (OpenAI's
    response_format). `strict`: every keyword of the schema is enforced, or the request refused."""

    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True)
class ChatInput:
    """A whole conversation to answer; the last assistant turn is left open by the template."""

    messages: tuple[Message, ...]
    output_format: OutputFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    # "none", "auto", "required", or the name of the one function the answer must call.
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    # Legacy completions: this text (tokenized with the tokenizer's defaults) or these token ids
    # are the whole prompt, verbatim: no template, no media; `messages` is then empty.
    prompt: str | tuple[int, ...] | None = None

    @property
    def calls_forced(self) -> bool:
        """Whether the answer must be tool calls (tool_choice "required" or a named function)."""
        return bool(self.tools) and self.tool_choice not in ("none", "auto")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability (and for a sampled token, the top alternatives at that step).

    `token_bytes` are the token's own bytes; `token` is their text, or OpenAI's `bytes:\\xNN`
    spelling when they are part of a character."""

    token_id: int
    token: str
    logprob: float
    token_bytes: bytes = b""
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class PromptLogprobs:
    """Each prompt token's log-probability given the tokens before it, in columns, with `top_k`
    alternatives per token from the second on (the first has none and logprob 0.0: nothing comes
    before it). Columns, not an object per token: a scored 30k-token prompt as TokenLogprobs is
    ~200k objects that every full garbage collection walks (eight such prompts made collections
    of 0.7 s, the event loop waiting); as columns of shared strings and floats it is a handful."""

    top_k: int
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_bytes: list[bytes] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # top_k entries per token from the second on, most likely first, flattened
    top_ids: list[int] = field(default_factory=list)
    top_tokens: list[str] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (a prompt recomputed after preemption is written again)."""
        k = self.top_k * max(0, length - 1)
        for column in (self.token_ids, self.tokens, self.token_bytes, self.logprobs):
            del column[length:]
        for column in (self.top_ids, self.top_tokens, self.top_logprobs):
            del column[k:]

    def top(self, position: int) -> list[tuple[str, float]]:
        """The alternatives (token, logprob) at `position` (none at 0)."""
        if position == 0:
            return []
        first = (position - 1) * self.top_k
        last = first + self.top_k
        return list(zip(self.top_tokens[first:last], self.top_logprobs[first:last], strict=True))


FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class CompletionDelta:
    """What one choice (index) produced since the previous output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class FinishedRequestStats:
    """What the engine reports with the last output of a request that finished (stop or length),
    for per-request metrics. Times are seconds of the engine's clock; preemptions included."""

    n: int
    max_tokens: int  # the effective limit (what max_model_len leaves when the client set none)
    max_choice_tokens: int  # tokens generated by the longest choice
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> last token


@dataclass
class RequestOutput:
    """One streamed update for a request: deltas of the choices that advanced, and usage so far."""

    request_id: str
    deltas: list[CompletionDelta]
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finished: bool = False
    error: Exception | None = None
    # Wall-clock seconds the request spent queued before its first scheduling (set once).
    queue_time: float | None = None
    # Prompt tokens the prefix cache held but that were computed again: the block holding the last
    # prompt token, whose logits are needed (0 or block_size).
    recomputed_tokens: int = 0
    stats: FinishedRequestStats | None = None  # on the finished output of a completed request
    # With params.prompt_logprobs: every prompt token's log-probability given the tokens before it.
    # Sent on the first output that carries a token, then None.
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and health."""

    num_running: int = 0
    num_waiting: int = 0
    num_paused: int = 0  # running requests whose clients are not reading
    cache_usage: float = 0.0  # KV blocks in use / total
    cache_used_blocks: int = 0
    cache_total_blocks: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found
    num_preemptions: int = 0
    vision_cache_bytes: int = 0
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    # Multimodal-cache queries and hits: a request's images and video frames, each counted once (at
    # admission if the processor found its features, else when first encoded). The prefix-cache
    # counters above count a request's prompt tokens once too, at its first admission.
    mm_cache_queries: int = 0
    mm_cache_hits: int = 0
    # Tokens computed per step (prompt chunks and decodes): a count per ITERATION_TOKEN_BUCKETS
    # bound (value <= bound, not cumulative), the last one for larger values; and their sum.
    iteration_tokens_buckets: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    cache_dtype: str = ""
    enable_prefix_caching: bool = False


# vLLM's bounds for its tokens-per-step histogram (vllm:iteration_tokens_total).
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
