"""Request and Sequence: the objects that carry one request from arrival to finish.

A `Request` is what a client asked for (one prompt, its images, its sampling settings); it owns
`n` `Sequence`s, one per choice, that share the prompt's prefill. Pure Python: the scheduler
reads these without importing torch; tensors ride along as opaque attributes.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from model_runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass
class ImageSlot:
    """One image (or video frame) of a prompt: its content key, tiles, and pixels until encoded."""

    key: str
    num_tiles: int
    pixel_values: Any | None  # torch.Tensor [tiles, 3, S, S]; dropped once features exist
    features: Any | None = None  # torch.Tensor [tiles * tokens_per_tile, hidden]


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its generated ids, cache slot, detokenizer and finish state."""

    request: Request
    index: int
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    status: Status = Status.WAITING
    finish_reason: str | None = None
    finish_reported: bool = False
    detokenizer: Any = None  # IncrementalDetokenizer
    generator: Any = None  # torch.Generator for seeded sampling, else None
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[Any] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens whose keys/values are (or will be, after this step) in the cache."""
        return self.request.prompt_len + len(self.output_ids)

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
    num_computed: int = 0  # prompt tokens already prefilled
    base_slot: int = -1  # slot that holds the prompt while it is prefilled
    seqs: list[Sequence] = field(default_factory=list)
    sink: Any = None  # callable(RequestOutput) delivering outputs to the client side
    prompt_counts: Any = None  # torch.Tensor [V] of prompt token counts, built once for penalties
    error: Exception | None = None

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(request=self, index=i) for i in range(self.params.n)]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
