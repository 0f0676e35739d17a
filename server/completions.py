"""Legacy completions (POST /v1/completions): each prompt of the list is one engine request, run
on the same engine, sampling and limits as chat; their choices are numbered prompt * n + choice.

What the engine does not do is refused by name rather than ignored: `suffix` (no fill-in-the-
middle) and `best_of` above `n` (no server-side ranking). `echo` with `logprobs` reports the prompt's
own log-probabilities (what evaluation harnesses score), computed by the engine, never from the
prefix cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

import anyio
from starlette.requests import Request
from starlette.responses import Response

from model_runtime.errors import RuntimeErrorBase
from model_runtime.request import ChatInput, PromptLogprobs, RequestOutput
from model_runtime.request import TokenLogprob as EngineTokenLogprob
from model_runtime.sampling_params import SamplingParams
from server.chat import (
    CLIENT_CLOSED_REQUEST,
    DISCONNECTED,
    LARGE_ANSWER_TOKENS,
    ChatService,
    EngineStreamResponse,
    cancel_on_disconnect,
    check_stream_options,
    close_quietly,
    dump_in_pieces,
    from_first,
    json_response,
    sampling_params,
)
from server.chat_output import ChunkWriter, to_finish_reason, to_usage
from server.errors import APIError, BadRequestError, to_api_error
from server.metrics import Metrics, RequestTracker
from server.protocol.chat import Usage
from server.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from server.settings import Settings

MAX_LOGPROBS = 5  # OpenAI's limit for completions
# Completions one request may ask for (prompts x n): a 32-prompt, n=8 request was 256 sequences
# that slowed every other client's request for seconds.
MAX_CHOICES = 64


def check_request(req: CompletionRequest) -> None:
    """Fields OpenAI defines that this server cannot honour, and OpenAI's own cross-field rules."""
    if req.suffix:
        raise BadRequestError(
            "'suffix' is not supported: InternVL models are not trained to fill in the middle. Send the "
            "text before the gap as 'prompt' without 'suffix'.",
            param="suffix",
            code="unsupported_parameter",
        )
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise BadRequestError(
            f"'best_of' must equal 'n' ({n}) here: this server returns every completion it generates "
            "and does not rank them. Leave 'best_of' out, or set 'n' to the number you want.",
            param="best_of",
            code="unsupported_parameter",
        )
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise BadRequestError(
            f"Invalid 'logprobs': expected a value from 0 to {MAX_LOGPROBS}, but got {req.logprobs} instead.",
            param="logprobs",
            code="integer_above_max_value" if req.logprobs > MAX_LOGPROBS else "integer_below_min_value",
        )
    check_stream_options(req)
    if req.max_tokens == 0:
        raise BadRequestError(
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            param="max_tokens",
            code="integer_below_min_value",
        )
    choices = len(req.prompts) * n
    if choices > MAX_CHOICES:
        raise BadRequestError(
            f"This request asks for {choices} completions ({len(req.prompts)} prompts x n={n}); at most "
            f"{MAX_CHOICES} per request. Send the prompts in several requests.",
            param="prompt",
            code="too_many_choices",
        )
    if isinstance(req.prompt, list) and not req.prompt:
        raise BadRequestError(
            "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an empty "
            "array instead.",
            param="prompt",
            code="empty_array",
        )


def as_prompt_error(exc: BaseException) -> BaseException:
    """The engine names `messages` where a chat would have them, and the detokenizer (echo) its
    `tokens`; here that is the prompt."""
    if isinstance(exc, RuntimeErrorBase | APIError) and (exc.param or "").startswith(("messages", "tokens")):
        exc.param = "prompt"
    return exc


def text_offsets(token_bytes: list[bytes], offset: int) -> list[int]:
    """Where each token starts, in characters from the start of the choice's text (as OpenAI
    counts `text_offset`), the first at `offset`."""
    offsets = []
    for data in token_bytes:
        offsets.append(offset)
        offset += len(data.decode("utf-8", errors="ignore"))
    return offsets


def to_completion_logprobs(items: list[EngineTokenLogprob], offset: int) -> CompletionLogprobs:
    """Sampled tokens' log-probabilities in the legacy column layout."""
    return CompletionLogprobs(
        text_offset=text_offsets([item.token_bytes for item in items], offset),
        tokens=[item.token for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{top.token: top.logprob for top in item.top} for item in items],
    )


def prompt_completion_logprobs(scored: PromptLogprobs) -> CompletionLogprobs:
    """An echoed prompt's log-probabilities in the legacy layout: the first token has none (null)."""
    offsets = text_offsets(scored.token_bytes, 0)
    k = scored.top_k
    tops = (
        [
            dict(zip(scored.top_tokens[i : i + k], scored.top_logprobs[i : i + k], strict=True))
            for i in range(0, len(scored.top_tokens), k)
        ]
        if k
        else [{} for _ in range(len(scored) - 1)]
    )
    return CompletionLogprobs(
        text_offset=offsets,
        tokens=list(scored.tokens),
        token_logprobs=[None, *scored.logprobs[1:]],
        top_logprobs=[None, *tops],
    )


class _Prompt:
    """One prompt's engine stream, its tracker and what its choices have produced so far. With
    `echo`, every choice starts with the prompt (and, with logprobs, the prompt's log-probabilities,
    which arrive with the first output)."""

    def __init__(self, index: int, n: int, echo: str | None, outputs: AsyncIterator[RequestOutput],
                 tracker: RequestTracker) -> None:  # fmt: skip
        self.index = index
        self.n = n
        self.echo = echo
        self.outputs = outputs
        self.tracker = tracker
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.offsets = [0] * n
        self.logprobs: list[CompletionLogprobs | None] = [None] * n
        self.reasons: list[str | None] = [None] * n
        self.last: RequestOutput | None = None

    def choice_index(self, i: int) -> int:
        return self.index * self.n + i

    def _record(self, i: int, text: str, logprobs: CompletionLogprobs | None) -> None:
        self.texts[i].append(text)
        self.offsets[i] += len(text)
        if logprobs is not None:
            whole = self.logprobs[i] = self.logprobs[i] or CompletionLogprobs()
            for column in ("text_offset", "tokens", "token_logprobs", "top_logprobs"):
                getattr(whole, column).extend(getattr(logprobs, column))

    async def add(self, out: RequestOutput) -> list[CompletionChoice]:
        """Record one engine output; returns what it adds as stream choices."""
        if out.error is not None:
            raise out.error
        self.tracker.on_output(out)
        first = self.last is None
        self.last = out
        choices = []
        if first and self.echo is not None:
            echoed = None
            scored = out.prompt_logprobs
            if scored is not None and len(scored) > LARGE_ANSWER_TOKENS:  # 0.1 s for 30k tokens
                echoed = await anyio.to_thread.run_sync(prompt_completion_logprobs, scored)
            elif scored is not None:
                echoed = prompt_completion_logprobs(scored)
            for i in range(self.n):
                self._record(i, self.echo, echoed)
                choices.append(
                    CompletionChoice(
                        index=self.choice_index(i), text=self.echo, logprobs=echoed, finish_reason=None
                    )
                )
        for delta in out.deltas:
            i = delta.index
            logprobs = None
            if delta.logprobs is not None:
                logprobs = to_completion_logprobs(delta.logprobs, self.offsets[i])
            self._record(i, delta.text, logprobs)
            reason = None
            if delta.finish_reason is not None:
                reason = self.reasons[i] = to_finish_reason(delta.finish_reason)
            if delta.text or logprobs is not None or reason is not None:
                choices.append(
                    CompletionChoice(
                        index=self.choice_index(i), text=delta.text, logprobs=logprobs, finish_reason=reason
                    )
                )
        if out.finished:
            self.tracker.finished(out, [r or "stop" for r in self.reasons])
        return choices

    def choices(self) -> list[CompletionChoice]:
        """The whole choices, for a response that is not streamed."""
        return [
            CompletionChoice(
                index=self.choice_index(i),
                text="".join(self.texts[i]),
                logprobs=self.logprobs[i],
                finish_reason=self.reasons[i] or "stop",  # type: ignore[arg-type]
            )
            for i in range(self.n)
        ]


def total_usage(prompts: list[_Prompt]) -> Usage:
    usages = [to_usage(p.last) for p in prompts if p.last is not None]
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    details = usages[0].prompt_tokens_details if usages else None
    if details is not None:
        details = details.model_copy(
            update={
                "cached_tokens": sum(
                    u.prompt_tokens_details.cached_tokens for u in usages if u.prompt_tokens_details
                )
            }
        )
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


class CompletionService:
    """Serves POST /v1/completions; model names, cache salts and the drain's bookkeeping are the
    chat service's."""

    def __init__(self, settings: Settings, chat: ChatService, metrics: Metrics) -> None:
        self._settings = settings
        self._chat = chat
        self._engine = chat.engine
        self._metrics = metrics

    async def create(self, req: CompletionRequest, request: Request) -> Response:
        try:
            salt = self._chat.cache_salt(req.cache_salt, request)
            response = await cancel_on_disconnect(request, self._create(req, salt))
        except Exception as exc:
            err = to_api_error(as_prompt_error(exc))
            self._metrics.error(err.code or err.error_type)
            raise err from None
        if response.status_code == CLIENT_CLOSED_REQUEST:
            self._metrics.error(DISCONNECTED)
        return response

    async def _create(self, req: CompletionRequest, cache_salt: str) -> Response:
        check_request(req)
        model = self._chat.resolve_model(req.model)
        self._chat.check_ready()
        params: SamplingParams = sampling_params(req, self._settings, self._engine.info)
        if req.echo and req.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        texts = req.prompts
        response_id = f"cmpl-{uuid.uuid4().hex}"
        prompts: list[_Prompt] = []
        firsts: list[RequestOutput] = []
        try:
            for index, prompt in enumerate(texts):
                request_id = f"{response_id}-{index}"
                outputs = self._engine.generate(
                    request_id, ChatInput(messages=(), prompt=prompt), params, cache_salt=cache_salt
                )
                self._chat.inflight.add(request_id)
                echo = None
                if req.echo:
                    echo = prompt if isinstance(prompt, str) else await self._engine.detokenize(list(prompt))
                prompts.append(_Prompt(index, params.n, echo, outputs, self._metrics.track()))
            # The first output is where the engine refuses a request: before any header goes out.
            firsts = list(await asyncio.gather(*(anext(p.outputs) for p in prompts)))
        except BaseException:
            await self._release(response_id, prompts)
            raise
        writer = ChunkWriter(response_id, int(time.time()), model)
        if req.stream:
            events = self._stream(writer, prompts, firsts, req.include_usage)
            return EngineStreamResponse(
                events,
                on_close=lambda: self._release(response_id, prompts),
                send_timeout_s=self._settings.stream_send_timeout_s,
                on_send_timeout=self._metrics.slow_client,
            )
        try:
            for prompt, first in zip(prompts, firsts, strict=True):
                async for out in from_first(first, prompt.outputs):
                    await prompt.add(out)
        except BaseException as exc:
            code = DISCONNECTED if isinstance(exc, asyncio.CancelledError) else None
            for prompt in prompts:
                prompt.tracker.failed(code or to_api_error(exc).code or "internal_error")
            raise
        finally:
            await self._release(response_id, prompts)
        completion = Completion(
            id=response_id,
            created=writer.created,
            model=model,
            choices=[c for p in prompts for c in p.choices()],
            usage=total_usage(prompts),
        )
        return await json_response(completion)

    async def _release(self, response_id: str, prompts: list[_Prompt]) -> None:
        for prompt in prompts:
            self._chat.inflight.discard(f"{response_id}-{prompt.index}")
            await close_quietly(prompt.outputs)

    async def _stream(
        self, writer: ChunkWriter, prompts: list[_Prompt], firsts: list[RequestOutput], include_usage: bool
    ) -> AsyncIterator[str]:
        """Chunks of every prompt's choices as they come (interleaved), usage, [DONE]; a failure
        after the headers went out becomes an error event, then [DONE]."""

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None, *, large: bool = False) -> str:
            body = Completion(
                id=writer.response_id,
                created=writer.created,
                model=writer.model,
                choices=choices,
                usage=usage,
            )
            exclude = None if usage else {"usage"}
            data = dump_in_pieces(body, exclude=exclude) if large else body.model_dump_json(exclude=exclude)
            return f"data: {data}\n\n"

        async def render(choices: list[CompletionChoice]) -> str:
            """A chunk; off the event loop, choice by choice, when it carries a long prompt's
            log-probabilities."""
            scored = sum(len(c.logprobs.tokens) for c in choices if c.logprobs is not None)
            if scored > LARGE_ANSWER_TOKENS:
                return await anyio.to_thread.run_sync(partial(chunk, choices, large=True))
            return chunk(choices)

        queue: asyncio.Queue[tuple[_Prompt, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(prompt: _Prompt, first: RequestOutput) -> None:
            try:
                async for out in from_first(first, prompt.outputs):
                    await queue.put((prompt, out))
            except Exception as exc:
                await queue.put((prompt, exc))
            await queue.put((prompt, None))

        tasks = [asyncio.ensure_future(pump(p, f)) for p, f in zip(prompts, firsts, strict=True)]
        try:
            running = len(prompts)
            while running:
                prompt, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                choices = await prompt.add(item)
                if choices:
                    yield await render(choices)
            if include_usage:
                yield chunk([], total_usage(prompts))
        except Exception as exc:
            err = to_api_error(as_prompt_error(exc))
            for prompt in prompts:
                prompt.tracker.failed(err.code or err.error_type)
            yield ChunkWriter.error(err)
        except (asyncio.CancelledError, GeneratorExit):
            for prompt in prompts:
                prompt.tracker.failed(DISCONNECTED)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield ChunkWriter.done()
