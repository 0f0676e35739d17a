"""Request and Sequence: the objects that carry one request from arrival to finish.

A `Request` is what a client asked for (one prompt, its images, its sampling settings); it owns
`n` `Sequence`s, one per choice. Pure Python: the scheduler and the block manager read these
without importing torch; tensors ride along as opaque attributes.

The engine's whole view of a sequence is "tokens, and how many of them have keys and values in
the cache" (`num_computed`): a prompt being prefilled, a sequence decoding (one token to compute)
and one being recomputed after preemption differ only in how far `num_computed` lags behind
`num_tokens`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from model_runtime.request import PromptLogprobs
from model_runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class ImageSlot:
    """One image (or video frame) of a prompt: where its tokens are and how much of it is encoded.

    Tiles are encoded independently by the vision tower, so an image can be encoded a few tiles per
    step; prompt tokens become computable as their tile's features arrive.
    """

    key: str  # content key: the same image at the same tiling has the same key
    num_tiles: int
    pixel_values: Any | None  # torch.Tensor [tiles, 3, S, S]; dropped once every tile is encoded
    features: Any | None = None  # torch.Tensor [tiles * tokens_per_tile, hidden], filled by tiles
    start: int = 0  # prompt index of its first image-context token
    num_tokens: int = 0  # image-context tokens: tiles * tokens per tile
    tiles_ready: int = 0
    stage: int = 0  # vision stages done on tile `tiles_ready` (engine/vision.py); 0: not started
    partial: Any | None = None  # that tile's hidden state between stages

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def ready_end(self) -> int:
        """Prompt index up to which this image's features exist."""
        return self.start + self.tiles_ready * (self.num_tokens // max(1, self.num_tiles))

    @property
    def complete(self) -> bool:
        return self.tiles_ready >= self.num_tiles


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its generated ids, KV blocks, detokenizer and finish state."""

    request: Request
    index: int
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks
    num_keyed_blocks: int = 0  # leading blocks already registered in the prefix cache
    reserved_end: int = 0  # blocks up to here after its last one are reserved for its growth
    finish_reason: str | None = None
    finish_reported: bool = False
    detokenizer: Any = None  # IncrementalDetokenizer
    generator: Any = None  # torch.Generator for seeded sampling, else None
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[Any] = field(default_factory=list)
    matcher: Any = None  # llguidance LLMatcher when the request's output is constrained

    @property
    def num_tokens(self) -> int:
        return self.request.prompt_len + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to compute before this sequence can sample its next one."""
        return self.num_tokens - self.num_computed

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output."""
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        out = self.output_ids[max(0, start - len(prompt)) : end - len(prompt)]
        return (prompt[start:] if start < len(prompt) else []) + out

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Request:
    """A client's request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    images: list[ImageSlot] = field(default_factory=list)
    image_token_count: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    seqs: list[Sequence] = field(default_factory=list)
    sink: Any = None  # callable(RequestOutput) delivering outputs to the client side
    prompt_counts: Any = None  # torch.Tensor [V] of prompt token counts, built once for penalties
    # The root of this prompt's prefix-cache keys: the tenant's salt and anything else (a RoPE
    # variant) that makes the same tokens compute different keys and values.
    cache_root: bytes = b""
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.cached_tokens)
    # params.prompt_logprobs: filled as chunks are computed (a prompt preempted before they were
    # reported is scored again from its start); reported once, then handed to that output.
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_reported: bool = False
    num_recomputed_tokens: int = 0  # prompt tokens the prefix cache held but computed again
    num_preemptions: int = 0
    # The steps that sampled its first and its latest token (time.monotonic), for metrics.
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Its client is not reading: the sequences keep their blocks but do not decode until it is
    # (outputs nobody reads would only pile up in memory).
    paused: bool = False

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(request=self, index=i) for i in range(self.params.n)]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def release(self) -> None:
        """Drop the tensors once the request has left the engine (finished, aborted, failed or
        refused). A request and its sequences refer to each other, so without this its pixels and
        features would wait for the cyclic garbage collector rather than go at once."""
        for slot in self.images:
            slot.pixel_values = slot.features = slot.partial = None
        self.prompt_counts = None

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def forked(self) -> bool:
        """Whether every choice has its own tokens (after the shared prompt, or after preemption)."""
        return all(s.output_ids for s in self.seqs)

    @property
    def scores_prompt(self) -> bool:
        """Whether computing its prompt also computes the prompt's log-probabilities (asked for,
        and not reported yet: a recompute after preemption needs only the keys and values)."""
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_reported

    def active_seqs(self) -> list[Sequence]:
        """The sequences that compute: the first alone until the shared prompt is done, then all
        unfinished ones."""
        if self.n > 1 and not self.seqs[0].output_ids:
            return [self.seqs[0]]
        return [s for s in self.seqs if not s.finished]
