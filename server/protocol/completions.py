"""Pydantic models of OpenAI's legacy completions API (POST /v1/completions), fields in the order
of OpenAI's reference. Evaluation harnesses (lm-eval's `local-completions`) and load generators
speak it; the prompt is used verbatim, without a chat template."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from model_runtime.sampling_params import SamplingParams
from server.protocol.chat import SamplingRequest, Usage

MAX_PROMPTS = 32  # prompts in one request's list; each is its own engine request


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | tuple[int, ...]]:
        """The prompt(s) as a list: texts, or token-id sequences."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [tuple(prompt)]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else tuple(p) for p in prompt]  # type: ignore[union-attr]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, *, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's settings; not yet validated (call `.validate()`)."""
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs is not None, self.logprobs or 0)


# ---------------------------------------------------------------------------------------------
# Responses.


class CompletionLogprobs(BaseModel):
    """Per-token log-probabilities, in the legacy API's column layout."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion of one prompt; `index` = prompt index * n + choice."""

    finish_reason: Literal["stop", "length"] | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(BaseModel):
    """The answer of POST /v1/completions (and, with `stream`, each chunk of it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
