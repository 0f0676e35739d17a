"""Pydantic models of OpenAI's legacy completions API (POST /v1/completions), fields in the order
of OpenAI's reference. Evaluation harnesses (lm-eval's `local-completions`) and load generators
speak it; the prompt is used verbatim, without a chat template."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from model_runtime.sampling_params import SamplingParams
from server.protocol.chat import OpenAIRequestModel, StreamOptions, Usage

MAX_PROMPTS = 32  # prompts in one request's list; each is its own engine request


class CompletionRequest(OpenAIRequestModel):
    """POST /v1/completions."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None  # a single string is accepted and stored as a list
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None

    # --- extensions (vLLM's names) ---
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(
                    f"keys must be token ids (non-negative integers as strings), not {key[:40]!r}"
                )
        return value

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
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, *, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's settings; not yet validated (call `.validate()`)."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            ignore_eos=self.ignore_eos,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
        )


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
