"""SamplingParams: the per-request generation settings, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model_runtime.errors import InvalidRequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1024  # each stop string; they are matched against every step's text
MAX_LOGIT_BIAS = 300  # OpenAI's limit


def _check(ok: bool, param: str, message: str, code: str = "invalid_value") -> None:
    if not ok:
        raise InvalidRequestError(message, param=param, code=code)


def _within(value: float, low: float | None, high: float | None, param: str) -> None:
    """OpenAI's range errors: `decimal_above_max_value` and friends, in its wording."""
    number = "integer" if isinstance(value, int) and not isinstance(value, bool) else "decimal"
    if high is not None and value > high:
        raise InvalidRequestError(
            f"Invalid '{param}': {number} above maximum value. Expected a value <= {high:g}, but got "
            f"{value} instead.",
            param=param,
            code=f"{number}_above_max_value",
        )
    if low is not None and value < low:
        raise InvalidRequestError(
            f"Invalid '{param}': {number} below minimum value. Expected a value >= {low:g}, but got "
            f"{value} instead.",
            param=param,
            code=f"{number}_below_min_value",
        )


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings of one request; `validate()` raises InvalidRequestError naming the field.

    temperature 0 means greedy. `seed` makes sampling reproducible whatever else is in the batch:
    each sequence draws from its own generator.
    """

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # Log-probabilities of the prompt's own tokens (each given the tokens before it) with this many
    # alternatives; None = not computed. Such a prompt is computed whole, never taken from the
    # prefix cache (a cached block has no logits).
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to its logit
    skip_special_tokens: bool = True  # False keeps markers a tool-call parser reads (InternLM2's)
    constraint: Any = field(default=None, repr=False)  # structured.grammar.Constraint
    extra_stop_token_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def greedy(self) -> bool:
        # top_p 0 keeps only the most likely token, as OpenAI reads it.
        return self.temperature == 0.0 or self.top_k == 1 or self.top_p == 0.0

    def validate(self, *, max_n: int = MAX_N) -> SamplingParams:
        _within(self.n, 1, max_n, "n")
        if self.max_tokens is not None:
            _within(self.max_tokens, 1, None, "max_tokens")
        _within(self.temperature, 0, 2, "temperature")
        _within(self.top_p, 0, 1, "top_p")
        _check(
            self.top_k >= -1, "top_k", "top_k must be -1, 0 (disabled) or positive", "integer_below_min_value"
        )
        _within(self.min_p, 0, 1, "min_p")
        _check(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "repetition_penalty must be in (0, 10]",
        )
        _within(self.presence_penalty, -2, 2, "presence_penalty")
        _within(self.frequency_penalty, -2, 2, "frequency_penalty")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP_STRINGS}, but "
            f"got an array with length {len(self.stop)} instead.",
            "array_above_max_length",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(
            all(len(s) <= MAX_STOP_CHARS for s in self.stop),
            "stop",
            f"stop strings may be {MAX_STOP_CHARS} chars",
        )
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop token ids must be >= 0")
        _within(self.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
        _check(
            not self.top_logprobs or self.logprobs,
            "top_logprobs",
            "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
        )
        if self.prompt_logprobs is not None:
            _within(self.prompt_logprobs, 0, MAX_TOP_LOGPROBS, "prompt_logprobs")
        if self.seed is not None:
            _within(self.seed, -(2**63), 2**63 - 1, "seed")
        _check(
            len(self.logit_bias) <= MAX_LOGIT_BIAS,
            "logit_bias",
            f"at most {MAX_LOGIT_BIAS} logit_bias entries",
            "array_above_max_length",
        )
        for token, bias in self.logit_bias:
            _within(bias, -100, 100, "logit_bias")
            _check(token >= 0, "logit_bias", "logit_bias keys are token ids (>= 0)")
        return self
