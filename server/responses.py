"""The Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}).

A Responses request is translated into a chat request and started by the chat service (same
validation, media path, limits, tools and output formats); only the shape of the answer differs:
output items (a message, function calls) and, when streamed, OpenAI's typed events
(`response.created` ... `response.output_text.delta` ... `response.completed`). Stored responses
live in a bounded in-memory store (count, bytes, age; see the settings), so `previous_response_id`
works on the replica that answered; a miss is a 404.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from model_runtime.errors import RuntimeErrorBase
from model_runtime.inputs.tools import ToolFormat
from model_runtime.request import RequestOutput
from model_runtime.request import TokenLogprob as EngineTokenLogprob
from server.chat import (
    CLIENT_CLOSED_REQUEST,
    DISCONNECTED,
    ChatService,
    EngineStreamResponse,
    Started,
    cancel_on_disconnect,
    from_first,
    json_response,
)
from server.chat_output import to_finish_reason
from server.errors import (
    APIError,
    BadRequestError,
    NotFoundError,
    from_validation_errors,
    printable,
    to_api_error,
)
from server.metrics import Metrics, RequestTracker
from server.protocol.chat import ChatCompletionRequest
from server.protocol.responses import (
    DeletedResponse,
    FunctionCall,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputFile,
    InputImage,
    InputText,
    InputTokensDetails,
    InputVideo,
    MessageItem,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTextContent,
    Refusal,
    ResponseErrorBody,
    ResponseLogprob,
    ResponseObject,
    ResponseRequest,
    ResponseTopLogprob,
    ResponseUsage,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    ToolChoiceFunction,
)
from server.settings import Settings
from server.tool_stream import ToolCallStream, call_id

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# `include` values that ask for nothing this server produces (no reasoning, no input echo): honoured
# by having nothing to add.
NOTHING_TO_INCLUDE = {"reasoning.encrypted_content", "message.input_image.image_url"}

# Where a chat field's error is a Responses field's error.
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "top_logprobs",
}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# ---------------------------------------------------------------------------------------------
# Request -> chat request (pure helpers).


def check_request(req: ResponseRequest) -> None:
    """Features of the Responses API this server does not have: refused by name."""
    refused = {
        "background": bool(req.background),
        "conversation": req.conversation is not None,
        "prompt": req.prompt is not None,
        "max_tool_calls": req.max_tool_calls is not None,
        "reasoning": req.reasoning not in (None, {})
        and (not isinstance(req.reasoning, dict) or req.reasoning.get("effort") not in (None, "none")),
    }
    for field, is_set in refused.items():
        if is_set:
            raise BadRequestError(
                f"'{field}' is not supported by this server (InternVL models, served without "
                f"{'reasoning' if field == 'reasoning' else 'that feature'}); leave it out.",
                param=field,
                code="unsupported_parameter",
            )
    for i, value in enumerate(req.include or []):
        if value != LOGPROBS_INCLUDE and value not in NOTHING_TO_INCLUDE:
            raise BadRequestError(
                f"include[{i}] {printable(value)[:60]!r} is not supported; this server can include "
                f"{LOGPROBS_INCLUDE!r}.",
                param=f"include[{i}]",
                code="unsupported_parameter",
            )
    if req.tool_choice is not None and not req.tools:
        raise BadRequestError(
            "tool_choice is only allowed when tools are given.", param="tool_choice", code="invalid_value"
        )


def _parts(content: str | Sequence[Any], where: str, role: str) -> str | list[dict[str, Any]]:
    """Input content as chat content: texts, images and videos."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if isinstance(part, InputText | OutputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, Refusal):
            parts.append({"type": "text", "text": part.refusal})
        elif isinstance(part, InputImage):
            if part.image_url is None:
                raise BadRequestError(
                    "input_image needs an image_url (an http(s) URL or a data: URI); file_id is not "
                    "supported here (no Files API).",
                    param=f"{here}.image_url",
                    code="unsupported_parameter" if part.file_id else "missing_required_parameter",
                )
            image: dict[str, Any] = {
                "url": part.image_url,
                "detail": "high" if part.detail == "original" else part.detail,
            }
            if part.max_dynamic_patch is not None:
                image["max_dynamic_patch"] = part.max_dynamic_patch
            parts.append({"type": "image_url", "image_url": image})
        elif isinstance(part, InputVideo):
            video: dict[str, Any] = {"url": part.video_url}
            for key in ("num_frames", "max_dynamic_patch"):
                if getattr(part, key) is not None:
                    video[key] = getattr(part, key)
            parts.append({"type": "video_url", "video_url": video})
        elif isinstance(part, InputFile):
            raise BadRequestError(
                "input_file is not supported; send images as input_image and text as input_text.",
                param=here,
                code="unsupported_parameter",
            )
    if role != "user" and any(p["type"] != "text" for p in parts):
        raise BadRequestError(
            f"Only user messages may contain images or videos ({where}).", param=where, code="invalid_value"
        )
    return parts


def input_messages(req: ResponseRequest) -> list[dict[str, Any]]:
    """The request's input as chat messages (instructions not included): function calls join the
    assistant message before them, their outputs become tool messages."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _parts(item.content, where, item.role)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = _parts(item.output, where, "tool")
            text = output if isinstance(output, str) else "".join(p["text"] for p in output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text})
    return messages


def output_messages(output: Sequence[OutputItem]) -> list[dict[str, Any]]:
    """A response's output as the chat history the next turn continues."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if isinstance(item, OutputMessage):
            message["content"] = "".join(part.text for part in item.content)
        else:
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            message.setdefault("tool_calls", []).append(call)
    if message["content"] is None and "tool_calls" not in message:
        message["content"] = ""
    return [message]


def to_chat_request(req: ResponseRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that serves `req` after `history` (a previous response's conversation)."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    messages += history + input_messages(req)
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    fields = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "seed": req.seed,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "cache_salt": req.cache_salt,
        "user": req.user,
    }
    body.update({key: value for key, value in fields.items() if value is not None})
    body["ignore_eos"] = req.ignore_eos
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    key: value
                    for key, value in (
                        ("name", t.name),
                        ("description", t.description),
                        ("parameters", t.parameters),
                        ("strict", t.strict),
                    )
                    if value is not None
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextFormatJSONObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, TextFormatJSONSchema):
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    if LOGPROBS_INCLUDE in (req.include or []) or req.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def as_responses_error(exc: BaseException) -> BaseException:
    """Errors name the Responses field, not the chat field it was translated into."""
    if isinstance(exc, RuntimeErrorBase | APIError) and exc.param:
        head, dot, rest = exc.param.partition(".")
        head, bracket, index = head.partition("[")
        if head in _PARAMS:
            exc.param = _PARAMS[head] + (bracket + index if head != "messages" else "") + dot + rest
    return exc


# ---------------------------------------------------------------------------------------------
# Engine outputs -> output items.


def to_logprobs(items: list[EngineTokenLogprob]) -> list[ResponseLogprob]:
    return [
        ResponseLogprob(
            token=item.token,
            logprob=item.logprob,
            bytes=list(item.token_bytes),
            top_logprobs=[
                ResponseTopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes))
                for t in item.top
            ],
        )
        for item in items
    ]


def to_usage(out: RequestOutput, block_size: int) -> ResponseUsage:
    """`cache_write_tokens`: the prompt's full blocks the prefix cache did not hold yet, which it
    holds now (a partial last block is not cached)."""
    written = max(0, out.prompt_tokens // block_size * block_size - out.cached_tokens) if block_size else 0
    return ResponseUsage(
        input_tokens=out.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=out.cached_tokens, cache_write_tokens=written, image_tokens=out.image_tokens
        ),
        output_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )


def base_response(req: ResponseRequest, response_id: str, model: str, created: int) -> ResponseObject:
    """The response's settings, as OpenAI echoes them; status and output are filled in later."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    text = (
        {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format
        else {"format": {"type": "text"}}
    )
    return ResponseObject(
        id=response_id,
        created_at=created,
        status="in_progress",
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=model,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=req.previous_response_id,
        store=req.store is not False,
        temperature=1.0 if req.temperature is None else req.temperature,
        text=text,
        tool_choice=(choice.model_dump() if isinstance(choice, BaseModel) else choice) or "auto",
        tools=tools,
        top_logprobs=req.top_logprobs or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        user=req.user,
        metadata=dict(req.metadata or {}),
    )


class Answer:
    """One response's output as the engine produces it: the message's text (tool calls taken out
    of it when tools are on), its logprobs, the calls, the finish."""

    def __init__(self, tools: ToolFormat | None, block_size: int = 0) -> None:
        self.block_size = block_size
        self.stream = ToolCallStream(tools) if tools is not None else None
        self.text: list[str] = []
        self.logprobs: list[EngineTokenLogprob] = []
        self.calls: list[FunctionCall] = []
        self.finish: str | None = None
        self.last: RequestOutput | None = None
        self.message_id = _item_id("msg")

    def feed(self, out: RequestOutput) -> list[tuple[str, Any]]:
        """Record one engine output; returns ("text", (delta, logprobs)) and ("call", FunctionCall)
        events in order."""
        if out.error is not None:
            raise out.error
        self.last = out
        events: list[tuple[str, Any]] = []
        for delta in out.deltas:
            text, calls = (delta.text, []) if self.stream is None else self.stream.feed(delta.text)
            if text or delta.logprobs:
                self.text.append(text)
                self.logprobs.extend(delta.logprobs or [])
                events.append(("text", (text, delta.logprobs or [])))
            events += [("call", self._call(c.call.name, c.call.arguments)) for c in calls]
            if delta.finish_reason is not None:
                self.finish = to_finish_reason(delta.finish_reason)
                if self.stream is not None:
                    text, calls = self.stream.finish()
                    if text:
                        self.text.append(text)
                        events.append(("text", (text, [])))
                    events += [("call", self._call(c.call.name, c.call.arguments)) for c in calls]
        return events

    def _call(self, name: str, arguments: str) -> FunctionCall:
        call = FunctionCall(
            id=_item_id("fc"), call_id=call_id(), name=name, arguments=arguments, status="completed"
        )
        self.calls.append(call)
        return call

    @property
    def incomplete(self) -> bool:
        return self.finish == "length"

    def message(self, with_logprobs: bool, status: str | None = None) -> OutputMessage:
        content = OutputTextContent(
            text="".join(self.text), logprobs=to_logprobs(self.logprobs) if with_logprobs else []
        )
        done = "incomplete" if self.incomplete else "completed"
        return OutputMessage(id=self.message_id, content=[content], status=status or done)  # type: ignore[arg-type]

    def output(self, with_logprobs: bool) -> list[OutputItem]:
        items: list[OutputItem] = []
        if "".join(self.text).strip() or not self.calls:
            items.append(self.message(with_logprobs))
        return [*items, *self.calls]

    def complete(self, response: ResponseObject, with_logprobs: bool) -> ResponseObject:
        assert self.last is not None
        return response.model_copy(
            update={
                "status": "incomplete" if self.incomplete else "completed",
                "completed_at": int(time.time()),
                "incomplete_details": IncompleteDetails(reason="max_output_tokens")
                if self.incomplete
                else None,
                "output": self.output(with_logprobs),
                "usage": to_usage(self.last, self.block_size),
            }
        )


# ---------------------------------------------------------------------------------------------
# The store.


@dataclass
class Stored:
    response: ResponseObject
    conversation: list[dict[str, Any]]  # chat messages up to and including this response's answer
    size: int
    expires: float


class ResponseStore:
    """Stored responses, oldest first; bounded by count, bytes and age (the settings)."""

    def __init__(self, max_items: int, max_bytes: int, ttl_s: float) -> None:
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: ResponseObject, conversation: list[dict[str, Any]]) -> None:
        size = len(response.model_dump_json()) + len(json.dumps(conversation))
        if self._max_items == 0 or size > self._max_bytes:
            return
        with self._lock:
            self._items[response.id] = Stored(response, conversation, size, time.monotonic() + self._ttl_s)
            self._bytes += size
            while len(self._items) > self._max_items or self._bytes > self._max_bytes:
                self._drop(next(iter(self._items)))

    def get(self, response_id: str, param: str | None = None) -> Stored:
        with self._lock:
            now = time.monotonic()
            while self._items and next(iter(self._items.values())).expires <= now:
                self._drop(next(iter(self._items)))
            stored = self._items.get(response_id)
        if stored is None:
            raise NotFoundError(
                f"No response with id '{printable(response_id)[:100]}' is stored here (responses are kept "
                "in memory on the replica that answered, for a limited time).",
                param=param,
                code="response_not_found",
            )
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        with self._lock:
            if response_id in self._items:
                self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        self._bytes -= self._items.pop(response_id).size


# ---------------------------------------------------------------------------------------------
# Orchestration.


class ResponseService:
    """Serves the Responses API through the chat service."""

    def __init__(self, settings: Settings, chat: ChatService, metrics: Metrics) -> None:
        self._settings = settings
        self._chat = chat
        self._metrics = metrics
        self.store = ResponseStore(
            settings.responses_store_max, settings.responses_store_max_bytes, settings.responses_store_ttl_s
        )

    def retrieve(self, response_id: str) -> ResponseObject:
        return self.store.get(response_id).response

    def delete(self, response_id: str) -> DeletedResponse:
        self.store.delete(response_id)
        return DeletedResponse(id=response_id)

    async def create(self, req: ResponseRequest, request: Request) -> Response:
        tracker = self._metrics.track()
        try:
            salt = self._chat.cache_salt(req.cache_salt, request)
            response = await cancel_on_disconnect(request, self._create(req, tracker, salt))
        except Exception as exc:
            err = to_api_error(as_responses_error(exc))
            tracker.failed(err.code or err.error_type)
            raise err from None
        if response.status_code == CLIENT_CLOSED_REQUEST:
            tracker.failed(DISCONNECTED)
        return response

    async def _create(self, req: ResponseRequest, tracker: RequestTracker, cache_salt: str) -> Response:
        check_request(req)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            history = self.store.get(req.previous_response_id, "previous_response_id").conversation
        chat = to_chat_request(req, history)
        run = await self._chat.start(chat, cache_salt, id_prefix="resp")
        response = base_response(req, run.request_id.replace("resp-", "resp_"), run.model, int(time.time()))
        conversation = history + input_messages(req)
        with_logprobs = bool(chat.logprobs)
        if req.stream:
            events = self._events(run, response, tracker, conversation, with_logprobs)
            return EngineStreamResponse(
                events,
                on_close=run.release,
                send_timeout_s=self._settings.stream_send_timeout_s,
                on_send_timeout=self._metrics.slow_client,
            )
        answer = Answer(run.tools, self._chat.engine.info.cache_block_size)
        try:
            async for out in from_first(run.first, run.outputs):
                tracker.on_output(out)
                answer.feed(out)
        finally:
            await run.release()
        done = answer.complete(response, with_logprobs)
        tracker.finished(answer.last, [answer.finish or "stop"])  # type: ignore[arg-type]
        self._keep(done, conversation)
        return await json_response(done)

    def _keep(self, response: ResponseObject, conversation: list[dict[str, Any]]) -> None:
        if response.store:
            self.store.put(response, conversation + output_messages(response.output))

    async def _events(
        self,
        run: Started,
        response: ResponseObject,
        tracker: RequestTracker,
        conversation: list[dict[str, Any]],
        with_logprobs: bool,
    ) -> AsyncIterator[str]:
        """OpenAI's event sequence; a failure after the headers went out is `response.failed`."""
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            body = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

        def dump(model: BaseModel) -> dict[str, Any]:
            return model.model_dump(mode="json")

        answer = Answer(run.tools, self._chat.engine.info.cache_block_size)
        message_open = False
        index = 0  # output_index of the next item
        message_index = 0
        try:
            yield event("response.created", response=dump(response))
            yield event("response.in_progress", response=dump(response))
            async for out in from_first(run.first, run.outputs):
                tracker.on_output(out)
                for kind, payload in answer.feed(out):
                    if kind == "text":
                        delta, logprobs = payload
                        if not message_open:
                            message_open, message_index = True, index
                            index += 1
                            item = answer.message(False, status="in_progress").model_copy(
                                update={"content": []}
                            )
                            yield event(
                                "response.output_item.added", output_index=message_index, item=dump(item)
                            )
                            yield event(
                                "response.content_part.added",
                                item_id=answer.message_id,
                                output_index=message_index,
                                content_index=0,
                                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                            )
                        yield event(
                            "response.output_text.delta",
                            item_id=answer.message_id,
                            output_index=message_index,
                            content_index=0,
                            delta=delta,
                            logprobs=[dump(lp) for lp in to_logprobs(logprobs)] if with_logprobs else [],
                        )
                    else:
                        call: FunctionCall = payload
                        added = call.model_copy(update={"arguments": "", "status": "in_progress"})
                        yield event("response.output_item.added", output_index=index, item=dump(added))
                        yield event(
                            "response.function_call_arguments.delta",
                            item_id=call.id,
                            output_index=index,
                            delta=call.arguments,
                        )
                        yield event(
                            "response.function_call_arguments.done",
                            item_id=call.id,
                            output_index=index,
                            name=call.name,
                            arguments=call.arguments,
                        )
                        yield event("response.output_item.done", output_index=index, item=dump(call))
                        index += 1
            if answer.last is None:
                return
            done = answer.complete(response, with_logprobs)
            if message_open:
                message = answer.message(with_logprobs)
                part = dump(message.content[0])
                yield event(
                    "response.output_text.done",
                    item_id=message.id,
                    output_index=message_index,
                    content_index=0,
                    text=message.content[0].text,
                    logprobs=part.get("logprobs") or [],
                )
                yield event(
                    "response.content_part.done",
                    item_id=message.id,
                    output_index=message_index,
                    content_index=0,
                    part=part,
                )
                yield event("response.output_item.done", output_index=message_index, item=dump(message))
                # The message was opened first, so it is first in the output even if calls followed.
                others = [item for item in done.output if not isinstance(item, OutputMessage)]
                done = done.model_copy(update={"output": [message, *others]})
            tracker.finished(answer.last, [answer.finish or "stop"])
            self._keep(done, conversation)
            yield event(
                "response.incomplete" if answer.incomplete else "response.completed", response=dump(done)
            )
        except Exception as exc:
            err = to_api_error(as_responses_error(exc))
            tracker.failed(err.code or err.error_type)
            failed = response.model_copy(
                update={
                    "status": "failed",
                    "error": ResponseErrorBody(code=_error_code(err), message=err.message),
                }
            )
            yield event("response.failed", response=dump(failed))
        except (asyncio.CancelledError, GeneratorExit):
            tracker.failed(DISCONNECTED)
            raise


def _error_code(err: APIError) -> str:
    """ResponseError.code is an enum of OpenAI's: a server-side failure is `server_error`."""
    return "server_error" if err.status_code >= 500 else "invalid_prompt"
