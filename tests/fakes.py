"""FakeEngine: a deterministic EngineClient for API tests, and small helpers around it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from model_runtime.engine_client import HealthState, ModelInfo
from model_runtime.errors import EngineDeadError, RequestFailedError
from model_runtime.request import (
    ChatInput,
    CompletionDelta,
    EngineStats,
    FinishedRequestStats,
    FinishReason,
    ImageInput,
    PromptLogprobs,
    RequestOutput,
    TokenLogprob,
    VideoInput,
)
from model_runtime.sampling_params import SamplingParams

FAKE_INFO = ModelInfo(
    max_model_len=4096,
    max_tiles_per_image=12,
    default_tiles_per_image=6,
    default_frames_per_video=8,
    template="fake",
)
IMAGE_TOKENS_PER_TILE = 256
VIDEO_TOKENS_PER_FRAME = 64
# What a failing engine puts in its error: the server must never show this to a client.
SECRET_DETAIL = "boom at /srv/models/secret.py object at 0x7f00deadbeef"
# The phase times a completed fake request reports: a fixed prefill, then a fixed time per step.
FAKE_QUEUE_S = 0.01
FAKE_PREFILL_S = 0.02
FAKE_STEP_S = 0.01


def answer_tokens(chat: ChatInput, index: int, n: int) -> list[str]:
    """The answer of choice `index`: 'echo: <last user text>' (choice-numbered when n > 1), by word."""
    user_texts = [p for m in chat.messages if m.role == "user" for p in m.parts if isinstance(p, str)]
    if chat.prompt is not None:  # legacy completions: the prompt, or its ids as words
        user_texts = [chat.prompt if isinstance(chat.prompt, str) else " ".join(f"t{t}" for t in chat.prompt)]
    words = [f"echo{index}:" if n > 1 else "echo:", *(" ".join(user_texts[-1:]).split() or ["(nothing)"])]
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def prompt_logprobs(chat: ChatInput, params: SamplingParams) -> PromptLogprobs | None:
    """The prompt's words as tokens: the first with logprob 0 (none), the others -0.25, with
    `prompt_logprobs` alternatives."""
    if params.prompt_logprobs is None:
        return None
    words = chat.prompt.split() if isinstance(chat.prompt, str) else [f"t{t}" for t in chat.prompt or ()]
    out = PromptLogprobs(top_k=params.prompt_logprobs)
    for i, word in enumerate(words):
        out.token_ids.append(len(word))
        out.tokens.append(word)
        out.token_bytes.append(word.encode())
        out.logprobs.append(0.0 if i == 0 else -0.25)
        if i:
            for j in range(params.prompt_logprobs):
                out.top_ids.append(900 + j)
                out.top_tokens.append(f"p{j}")
                out.top_logprobs.append(-1.0 - j)
    return out


def image_token_count(chat: ChatInput) -> int:
    count = 0
    for message in chat.messages:
        for part in message.parts:
            if isinstance(part, ImageInput):
                count += IMAGE_TOKENS_PER_TILE * (part.max_tiles or FAKE_INFO.default_tiles_per_image)
            elif isinstance(part, VideoInput):
                count += VIDEO_TOKENS_PER_FRAME * (part.num_frames or FAKE_INFO.default_frames_per_video)
    return count


@dataclass
class _Choice:
    tokens: list[str]
    emitted: str = ""
    finish: FinishReason | None = None


@dataclass
class FakeEngine:
    """Echoes the last user message word by word; supports n, stop, max_tokens, logprobs and usage.

    Knobs: `error` is raised before the first output (a request error); `fail_after` ends the
    stream with an error output after that many steps; `token_delay_s` paces the steps;
    `die_after_s` / `die_on_text` turn `health` to "dead". Aborts (the stream closed before its
    end, or `abort()`) are recorded.
    """

    info: ModelInfo = FAKE_INFO
    health_state: HealthState = "ready"
    error: BaseException | None = None
    fail_after: int | None = None
    token_delay_s: float = 0.0
    die_after_s: float | None = None
    die_on_text: str | None = None
    engine_stats: EngineStats = field(
        default_factory=lambda: EngineStats(num_running=2, num_waiting=1, cache_usage=0.25)
    )
    calls: list[tuple[str, ChatInput, SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    cache_salts: list[str] = field(default_factory=list)
    cut: dict[str, Exception] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    _born: float = field(default_factory=time.monotonic)

    @property
    def health(self) -> HealthState:
        if self.die_after_s is not None and time.monotonic() - self._born > self.die_after_s:
            return "dead"
        return self.health_state

    def stats(self) -> EngineStats:
        return self.engine_stats

    def generate(
        self, request_id: str, chat: ChatInput, params: SamplingParams, *, cache_salt: str = ""
    ) -> AsyncIterator[RequestOutput]:
        self.cache_salts.append(cache_salt)
        return self._generate(request_id, chat, params)

    async def tokenize(self, chat: ChatInput) -> list[int]:
        """Words as ids (their lengths), image tokens as 0s."""
        if self.error is not None:
            raise self.error
        if isinstance(chat.prompt, tuple):
            return list(chat.prompt)
        words = (chat.prompt or "").split() + [
            w for m in chat.messages for p in m.parts if isinstance(p, str) for w in p.split()
        ]
        return [len(w) for w in words] + [0] * image_token_count(chat)

    async def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(f"t{t}" for t in token_ids)

    async def abort(self, request_id: str, error: Exception | None = None) -> None:
        self.aborted.append(request_id)
        if error is not None:
            self.cut[request_id] = error

    async def _generate(
        self, request_id: str, chat: ChatInput, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append((request_id, chat, params))
        if self.error is not None:
            raise self.error
        if self.die_on_text is not None and answer_tokens(chat, 0, 1)[1:] == [f" {self.die_on_text}"]:
            self.health_state = "dead"
            raise EngineDeadError("the engine failed")
        image_tokens = image_token_count(chat)
        text_tokens = sum(len(p.split()) for m in chat.messages for p in m.parts if isinstance(p, str))
        if chat.prompt is not None:
            text_tokens = len(chat.prompt.split()) if isinstance(chat.prompt, str) else len(chat.prompt)
        prompt_tokens = text_tokens + image_tokens
        choices = [_Choice(answer_tokens(chat, i, params.n)) for i in range(params.n)]
        completion_tokens = 0
        choice_tokens = [0] * params.n
        done = False
        try:
            for step in range(max(len(c.tokens) for c in choices)):
                if self.fail_after is not None and step >= self.fail_after:
                    done = True
                    yield RequestOutput(
                        request_id, [], prompt_tokens, completion_tokens, image_tokens,
                        finished=True, error=RequestFailedError(SECRET_DETAIL),
                    )  # fmt: skip
                    return
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if request_id in self.cut:
                    done = True
                    yield RequestOutput(
                        request_id, [], prompt_tokens, completion_tokens, image_tokens,
                        finished=True, error=self.cut[request_id],
                    )  # fmt: skip
                    return
                deltas = [d for i, c in enumerate(choices) if (d := _step(c, i, step, params)) is not None]
                completion_tokens += sum(len(d.token_ids) for d in deltas)
                for d in deltas:
                    choice_tokens[d.index] += len(d.token_ids)
                done = all(c.finish is not None for c in choices)
                stats = None
                if done:
                    stats = FinishedRequestStats(
                        n=params.n,
                        max_tokens=params.max_tokens or self.info.max_model_len - prompt_tokens,
                        max_choice_tokens=max(choice_tokens),
                        prefill_time=FAKE_PREFILL_S,
                        decode_time=FAKE_STEP_S * step,
                    )
                yield RequestOutput(
                    request_id, deltas, prompt_tokens, completion_tokens, image_tokens,
                    finished=done, queue_time=FAKE_QUEUE_S if step == 0 else None, stats=stats,
                    prompt_logprobs=prompt_logprobs(chat, params) if step == 0 else None,
                )  # fmt: skip
                if done:
                    self.finished.append(request_id)
                    return
        finally:
            if not done:
                self.aborted.append(request_id)


def _step(choice: _Choice, index: int, step: int, params: SamplingParams) -> CompletionDelta | None:
    if choice.finish is not None:
        return None
    token = choice.tokens[step]
    text = choice.emitted + token
    finish: FinishReason | None = None
    for stop in params.stop:
        if stop in text:
            text, finish = text[: text.index(stop)], "stop"
            break
    delta_text = text[len(choice.emitted) :]
    choice.emitted = text
    if finish is None and params.max_tokens is not None and step + 1 >= params.max_tokens:
        finish = "length"
    if finish is None and step + 1 == len(choice.tokens):
        finish = "stop"
    choice.finish = finish
    logprobs = None
    if params.logprobs:
        top = tuple(
            TokenLogprob(token_id=100 + j, token=f"alt{j}", logprob=-1.0 - j, token_bytes=f"alt{j}".encode())
            for j in range(params.top_logprobs)
        )
        logprobs = [TokenLogprob(step, token, -0.5, token.encode(), top)]
    return CompletionDelta(index, delta_text, [step], logprobs, finish)


def parse_sse(body: str) -> list[Any]:
    """SSE body -> list of decoded `data:` payloads ('[DONE]' kept as the string)."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
