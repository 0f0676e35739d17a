"""SamplingParams: the per-request generation settings, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model_runtime.errors import InvalidRequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # each stop string; they are matched against every step's text
MAX_LOGIT_BIAS = 300  # OpenAI's limit


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to its logit
    skip_special_tokens: bool = True  # False keeps markers a tool-call parser reads (InternLM2's)
    constraint: Any = field(default=None, repr=False)  # structured.grammar.Constraint
    extra_stop_token_ids: tuple[int, ...] = field(default=(), repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, *, max_n: int = MAX_N) -> SamplingParams:
        _check(isinstance(self.n, int) and 1 <= self.n <= max_n, "n", f"n must be between 1 and {max_n}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "temperature must be between 0 and 2")
        _check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        _check(self.top_k >= 0 or self.top_k == -1, "top_k", "top_k must be -1, 0 (disabled) or positive")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be between 0 and 1")
        _check(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "repetition_penalty must be in (0, 10]",
        )
        _check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            "presence_penalty must be between -2 and 2",
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "frequency_penalty must be between -2 and 2",
        )
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        _check(
            all(len(s) <= MAX_STOP_CHARS for s in self.stop),
            "stop",
            f"stop strings may be {MAX_STOP_CHARS} chars",
        )
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop token ids must be >= 0")
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
        )
        _check(not self.top_logprobs or self.logprobs, "top_logprobs", "top_logprobs requires logprobs=true")
        _check(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "seed must fit in 64 bits")
        _check(
            len(self.logit_bias) <= MAX_LOGIT_BIAS,
            "logit_bias",
            f"at most {MAX_LOGIT_BIAS} logit_bias entries",
        )
        _check(
            all(t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias),
            "logit_bias",
            "logit_bias maps token ids (>= 0) to values between -100 and 100",
        )
        return self
