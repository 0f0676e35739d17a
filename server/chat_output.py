"""Engine outputs -> OpenAI's ChatCompletion or its chunks; small pieces, each one shape."""

from __future__ import annotations

import json
from collections.abc import Sequence

from model_runtime.inputs.tools import ToolFormat
from model_runtime.request import FinishReason as EngineFinishReason
from model_runtime.request import RequestOutput
from model_runtime.request import TokenLogprob as EngineTokenLogprob
from server.errors import APIError, ServiceUnavailableError
from server.grounding import find_boxes
from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    FinishReason,
    FunctionCallChunk,
    FunctionCallOut,
    GroundingBox,
    PromptTokensDetails,
    ResponseMessage,
    TokenLogprob,
    ToolCallChunk,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from server.tool_stream import StreamedCall, ToolCallStream, call_id


def to_finish_reason(reason: EngineFinishReason) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "abort":
        # The engine gave up on the request (e.g. shutting down): not a normal end of the answer.
        raise ServiceUnavailableError("The request was aborted by the server; retry.", code="aborted")
    return "stop"


def to_logprobs(items: list[EngineTokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.token_bytes),
                top_logprobs=[
                    TopLogprob(token=top.token, logprob=top.logprob, bytes=list(top.token_bytes))
                    for top in item.top
                ],
            )
            for item in items
        ]
    )


def to_usage(out: RequestOutput) -> Usage:
    """`prompt_tokens` is the engine's count, which includes image and video tokens."""
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=out.cached_tokens, image_tokens=out.image_tokens
        ),
    )


class ChunkWriter:
    """Serializes the SSE events of one response; every chunk shares id, created and model."""

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self.response_id = response_id
        self.created = created
        self.model = model

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.response_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    def role(self, index: int) -> str:
        return self._chunk([ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])

    def content(self, index: int, text: str, logprobs: ChoiceLogprobs | None) -> str:
        return self._chunk([ChunkChoice(index=index, delta=DeltaMessage(content=text), logprobs=logprobs)])

    def tool_call(self, index: int, streamed: StreamedCall) -> list[str]:
        """A call as OpenAI streams one: index, id, type and name (arguments ""), then arguments."""
        head = ToolCallChunk(
            index=streamed.index,
            id=streamed.id,
            type="function",
            function=FunctionCallChunk(name=streamed.call.name, arguments=""),
        )
        args = ToolCallChunk(
            index=streamed.index, function=FunctionCallChunk(arguments=streamed.call.arguments)
        )
        return [
            self._chunk([ChunkChoice(index=index, delta=DeltaMessage(tool_calls=[piece]))])
            for piece in (head, args)
        ]

    def finish(self, index: int, reason: FinishReason, grounding: list[GroundingBox] | None = None) -> str:
        delta = DeltaMessage(grounding=grounding)
        return self._chunk([ChunkChoice(index=index, delta=delta, finish_reason=reason)])

    def usage(self, out: RequestOutput) -> str:
        return self._chunk([], usage=to_usage(out))

    @staticmethod
    def error(err: APIError) -> str:
        return f"data: {json.dumps(err.body())}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


class StreamState:
    """Which choices have finished, and the events each engine output turns into. With a tool
    format, each choice's text goes through a ToolCallStream (server/tool_stream.py)."""

    def __init__(
        self, writer: ChunkWriter, n: int, images: Sequence[bytes] = (), tool_format: ToolFormat | None = None
    ) -> None:
        self._writer = writer
        self._n = n
        self._reasons: dict[int, FinishReason] = {}
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._images = images
        self._tools = [ToolCallStream(tool_format) for _ in range(n)] if tool_format is not None else None

    def events_for(self, out: RequestOutput) -> list[str]:
        if out.error is not None:
            raise out.error
        events: list[str] = []
        for delta in out.deltas:
            index = delta.index
            if delta.text or delta.logprobs:
                self._texts[index].append(delta.text)
                text, calls = delta.text, []
                if self._tools is not None:
                    text, calls = self._tools[index].feed(delta.text)
                if text or delta.logprobs:
                    events.append(self._writer.content(index, text, to_logprobs(delta.logprobs)))
                for call in calls:
                    events.extend(self._writer.tool_call(index, call))
            if delta.finish_reason is not None and index not in self._reasons:
                reason = to_finish_reason(delta.finish_reason)
                if self._tools is not None:
                    text, calls = self._tools[index].finish()
                    if text:
                        events.append(self._writer.content(index, text, None))
                    for call in calls:
                        events.extend(self._writer.tool_call(index, call))
                    if self._tools[index].calls and reason == "stop":
                        reason = "tool_calls"
                self._reasons[index] = reason
                boxes = find_boxes("".join(self._texts[index]), self._images)
                events.append(self._writer.finish(index, reason, boxes))
        return events

    def close(self) -> list[str]:
        """Finish chunks for choices the engine ended without a reason, so clients see every end."""
        missing = [i for i in range(self._n) if i not in self._reasons]
        for index in missing:
            self._reasons[index] = "stop"
        return [self._writer.finish(index, "stop") for index in missing]

    def finish_reasons(self) -> list[str]:
        return [self._reasons[i] for i in sorted(self._reasons)]


class CompletionBuilder:
    """Accumulates the choices of a non-streaming response."""

    def __init__(
        self, writer: ChunkWriter, n: int, images: Sequence[bytes] = (), tool_format: ToolFormat | None = None
    ) -> None:
        self._writer = writer
        self._images = images
        self._tool_format = tool_format
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[EngineTokenLogprob] | None] = [None] * n
        self._reasons: list[FinishReason] = ["stop"] * n
        self._last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        if out.error is not None:
            raise out.error
        for delta in out.deltas:
            self._texts[delta.index].append(delta.text)
            if delta.logprobs is not None:
                bucket = self._logprobs[delta.index]
                if bucket is None:
                    bucket = self._logprobs[delta.index] = []
                bucket.extend(delta.logprobs)
            if delta.finish_reason is not None:
                self._reasons[delta.index] = to_finish_reason(delta.finish_reason)
        self._last = out

    def build(self) -> ChatCompletion:
        assert self._last is not None, "build() before any output"
        w = self._writer
        choices = [self._choice(i, "".join(texts)) for i, texts in enumerate(self._texts)]
        return ChatCompletion(
            id=w.response_id, created=w.created, model=w.model, choices=choices, usage=to_usage(self._last)
        )

    def _choice(self, index: int, text: str) -> Choice:
        reason = self._reasons[index]
        content: str | None = text
        tool_calls = None
        if self._tool_format is not None:
            content, calls = self._tool_format.parse(text)
            if calls:
                tool_calls = [
                    ToolCallOut(id=call_id(), function=FunctionCallOut(name=c.name, arguments=c.arguments))
                    for c in calls
                ]
                reason = "tool_calls" if reason == "stop" else reason
        return Choice(
            index=index,
            message=ResponseMessage(
                content=content, tool_calls=tool_calls, grounding=find_boxes(text, self._images)
            ),
            logprobs=to_logprobs(self._logprobs[index]),
            finish_reason=reason,
        )
