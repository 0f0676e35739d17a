"""Chat completions: protocol request -> engine request, and engine outputs -> response or SSE.

Order of work for one request: model name, sampling parameters and media counts are checked
first (cheap 4xx); then media are fetched concurrently; then the engine is asked for the first
output, which is when it reports request errors, so they still get a proper status; only then do
headers go out. A client that leaves at any point closes the engine's generator, which aborts
the request in the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

from model_runtime.engine_client import EngineClient, ModelInfo
from model_runtime.errors import InvalidRequestError
from model_runtime.inputs.tools import FORMATS, ToolFormat
from model_runtime.request import (
    ChatInput,
    ImageInput,
    Message,
    OutputFormat,
    Part,
    RequestOutput,
    ToolCall,
    ToolSpec,
    VideoInput,
)
from model_runtime.sampling_params import SamplingParams
from server.chat_output import ChunkWriter, CompletionBuilder, StreamState
from server.errors import BadRequestError, NotFoundError, ServiceUnavailableError, printable, to_api_error
from server.media import MediaFetcher, MediaKind
from server.metrics import Metrics, RequestTracker
from server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ImagePart,
    ImageURL,
    NamedToolChoice,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SamplingRequest,
    TextPart,
    VideoPart,
    VideoURL,
)
from server.protocol.completions import Completion
from server.protocol.responses import ResponseObject
from server.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; never seen by the client
DISCONNECTED = "client_disconnected"  # error_type label in metrics


# ---------------------------------------------------------------------------------------------
# Request -> engine request (pure helpers).


def image_tiles(image: ImageURL, info: ModelInfo) -> int | None:
    """Tiles for one image: `max_dynamic_patch` wins over `detail`; None = the model's default."""
    if image.max_dynamic_patch is not None:
        return min(image.max_dynamic_patch, info.max_tiles_per_image)
    if image.detail == "low":
        return 1
    if image.detail == "high":
        return info.max_tiles_per_image
    return None


def video_frames(video: VideoURL, settings: Settings) -> int | None:
    return None if video.num_frames is None else min(video.num_frames, settings.max_frames_per_video)


def video_tiles(video: VideoURL, info: ModelInfo) -> int | None:
    return None if video.max_dynamic_patch is None else min(video.max_dynamic_patch, info.max_tiles_per_image)


def sampling_params(req: SamplingRequest, settings: Settings, info: ModelInfo) -> SamplingParams:
    """Validated SamplingParams; errors name the field the client actually sent."""
    ceiling = settings.max_tokens_ceiling or info.max_model_len
    requested = req.requested_max_tokens
    if requested is not None and requested > ceiling:
        raise BadRequestError(
            f"'{req.max_tokens_param}' is {requested}; this server allows at most {ceiling}.",
            param=req.max_tokens_param,
            code="invalid_value",
        )
    try:
        return req.to_sampling_params(default_max_tokens=settings.default_max_tokens).validate(
            max_n=settings.max_n
        )
    except InvalidRequestError as exc:
        param = req.max_tokens_param if exc.param == "max_tokens" else exc.param
        raise BadRequestError(exc.message, param=param, code=exc.code or "invalid_value") from None


@dataclass(frozen=True)
class MediaJob:
    """One image or video to fetch, with its engine-side limits already clamped."""

    kind: MediaKind
    url: str
    param: str
    max_tiles: int | None = None
    num_frames: int | None = None


PlannedPart = str | MediaJob


def plan_messages(
    req: ChatCompletionRequest, settings: Settings, info: ModelInfo
) -> list[tuple[str, list[PlannedPart]]]:
    """Roles and parts in order, media not yet fetched; counts checked here, before any fetch."""
    planned: list[tuple[str, list[PlannedPart]]] = []
    images = videos = 0
    for i, message in enumerate(req.messages):
        role = "system" if message.role == "developer" else message.role
        parts: list[PlannedPart] = []
        for j, part in enumerate(message.content or []):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                parts.append(part.text)
                continue
            if role != "user":
                raise BadRequestError(
                    f"Only user messages may contain images or videos ({where}).", param=where
                )
            if isinstance(part, ImagePart):
                images += 1
                parts.append(
                    MediaJob(
                        "image",
                        part.image_url.url,
                        f"{where}.image_url.url",
                        image_tiles(part.image_url, info),
                    )
                )
            elif isinstance(part, VideoPart):
                videos += 1
                v = part.video_url
                parts.append(
                    MediaJob(
                        "video",
                        v.url,
                        f"{where}.video_url.url",
                        video_tiles(v, info),
                        video_frames(v, settings),
                    )
                )
        planned.append((role, parts))
    if images > settings.max_images_per_request:
        raise BadRequestError(
            f"Too many images: {images}; at most {settings.max_images_per_request} per request.",
            param="messages",
            code="too_many_images",
        )
    if videos > settings.max_videos_per_request:
        raise BadRequestError(
            f"Too many videos: {videos}; at most {settings.max_videos_per_request} per request.",
            param="messages",
            code="too_many_videos",
        )
    return planned


def check_stream_options(req: SamplingRequest) -> None:
    """OpenAI allows stream_options only with stream (chat and legacy completions alike)."""
    if req.stream_options is not None and not req.stream:
        raise BadRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )


def check_request(req: ChatCompletionRequest) -> None:
    """What OpenAI requires beyond each field's own type: content where a role needs it, and
    stream_options only with stream."""
    check_stream_options(req)
    for i, message in enumerate(req.messages):
        if message.content == []:
            raise BadRequestError(
                f"Invalid 'messages[{i}].content': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                param=f"messages[{i}].content",
                code="empty_array",
            )
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise BadRequestError(
                f"Missing required parameter: 'messages[{i}].content'.",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )


def with_tools(chat: ChatInput, req: ChatCompletionRequest) -> ChatInput:
    """The request's tools, tool_choice, and the tool calls and results of its history."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools:
        raise BadRequestError(
            "tool_choice is only allowed when tools are given.", param="tool_choice", code="invalid_value"
        )
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequestError("tools must have distinct function names.", param="tools", code="invalid_value")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise BadRequestError(
                f"tool_choice names the function '{printable(choice.function.name)}', which is not in tools.",
                param="tool_choice.function.name",
                code="invalid_value",
            )
        choice_name = choice.function.name
    else:
        choice_name = choice or "auto"
    messages = []
    called = False  # an earlier assistant message made tool calls
    for i, (message, sent) in enumerate(zip(chat.messages, req.messages, strict=True)):
        if sent.tool_calls and sent.role != "assistant":
            raise BadRequestError(
                "Only assistant messages carry tool_calls.",
                param=f"messages[{i}].tool_calls",
                code="invalid_value",
            )
        if sent.role == "tool" and not sent.tool_call_id:
            raise BadRequestError(
                "A tool message needs the tool_call_id of the call it answers.",
                param=f"messages[{i}].tool_call_id",
                code="invalid_value",
            )
        if sent.role == "tool" and not called:
            raise BadRequestError(
                "Invalid parameter: messages with role 'tool' must be a response to a preceding message "
                "with 'tool_calls'.",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        called = called or bool(sent.tool_calls)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in sent.tool_calls or ())
        messages.append(dataclasses.replace(message, tool_calls=calls, tool_call_id=sent.tool_call_id))
    specs = tuple(
        ToolSpec(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters,
            strict=bool(t.function.strict),
            raw=t.function.raw,
        )
        for t in tools
    )
    return dataclasses.replace(
        chat,
        messages=tuple(messages),
        tools=specs,
        tool_choice=choice_name,
        parallel_tool_calls=req.parallel_tool_calls is not False,
    )


def output_format(req: ChatCompletionRequest) -> OutputFormat | None:
    """response_format as the runtime's OutputFormat; "text" (or none) leaves the output free."""
    fmt = req.response_format
    if isinstance(fmt, ResponseFormatJSONObject):
        return OutputFormat("json_object")
    if isinstance(fmt, ResponseFormatJSONSchema):
        spec = fmt.json_schema
        # OpenAI: a json_schema format without a schema accepts any JSON.
        return OutputFormat("json_schema", spec.schema_ or {}, strict=bool(spec.strict))
    return None


async def fetch_media(planned: list[tuple[str, list[PlannedPart]]], fetcher: MediaFetcher) -> ChatInput:
    """Fetch every media part concurrently; the first failure cancels the rest."""
    jobs = [part for _, parts in planned for part in parts if isinstance(part, MediaJob)]
    tasks = [asyncio.ensure_future(fetcher.fetch(job.url, job.kind, job.param)) for job in jobs]
    try:
        blobs = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    fetched = iter(blobs)  # in the order the jobs were listed, which is the order walked below
    messages = []
    for role, parts in planned:
        out: list[Part] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            elif part.kind == "image":
                out.append(ImageInput(next(fetched), max_tiles=part.max_tiles))
            else:
                out.append(
                    VideoInput(next(fetched), num_frames=part.num_frames, max_tiles_per_frame=part.max_tiles)
                )
        messages.append(Message(role=role, parts=tuple(out)))  # type: ignore[arg-type]
    return ChatInput(messages=tuple(messages))


# ---------------------------------------------------------------------------------------------
# Orchestration.


@dataclass
class Started:
    """A request the engine accepted: its first output, the rest to come, and how to let go."""

    request_id: str
    model: str
    params: SamplingParams
    first: RequestOutput
    outputs: AsyncIterator[RequestOutput]
    release: Callable[[], Awaitable[None]]  # closes the engine stream (aborting it if unfinished)
    images: list[bytes]  # the request's images, in order, for grounding boxes
    tools: ToolFormat | None  # how to read tool calls out of the text, when tools are on


class ChatService:
    """Serves POST /v1/chat/completions against one engine."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        fetcher: MediaFetcher,
        metrics: Metrics,
        model_names: list[str],
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._fetcher = fetcher
        self._metrics = metrics
        self._model_names = model_names
        self.inflight: set[str] = set()  # engine request ids, from generate() to the stream's close

    @property
    def engine(self) -> EngineClient:
        return self._engine

    def resolve_model(self, name: str) -> str:
        if name not in self._model_names:
            raise NotFoundError(
                f"The model '{printable(name)[:200]}' does not exist.", param="model", code="model_not_found"
            )
        return name

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        tracker = self._metrics.track()
        try:
            salt = self.cache_salt(req.cache_salt, request)
            response = await cancel_on_disconnect(request, self._create(req, tracker, salt))
        except Exception as exc:
            err = to_api_error(exc)
            tracker.failed(err.code or err.error_type)
            raise err from None
        if response.status_code == CLIENT_CLOSED_REQUEST:
            tracker.failed(DISCONNECTED)
        return response

    def cache_salt(self, salt: str | None, request: Request) -> str:
        """What keys this request's cache entries: its own cache_salt and, when caches are isolated
        by API key, the key it was authorized with (hashed again by the processor)."""
        parts = [salt or ""]
        if self._settings.cache_isolation == "api_key":
            parts.append(request.headers.get("authorization", ""))
        return "\0".join(parts) if any(parts) else ""

    async def start(
        self, req: ChatCompletionRequest, cache_salt: str, id_prefix: str = "chatcmpl"
    ) -> Started:
        """Everything up to the engine's first output: checks, media, the engine request. The
        Responses API starts its requests here too, from a chat request it translated."""
        check_request(req)
        model = self.resolve_model(req.model)
        self.check_ready()
        info = self._engine.info
        params = sampling_params(req, self._settings, info)
        planned = plan_messages(req, self._settings, info)
        chat = await fetch_media(planned, self._fetcher)
        chat = with_tools(dataclasses.replace(chat, output_format=output_format(req)), req)
        # Server-made and unguessable: a client-chosen id could collide with (and abort) another's.
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        outputs = self._engine.generate(request_id, chat, params, cache_salt=cache_salt)
        self.inflight.add(request_id)

        async def release() -> None:
            self.inflight.discard(request_id)
            await close_quietly(outputs)

        try:
            first = await anext(outputs)
        except BaseException:
            await release()
            raise
        images = [p.data for m in chat.messages for p in m.parts if isinstance(p, ImageInput)]
        tools = FORMATS[info.tool_format] if chat.tools and chat.tool_choice != "none" else None
        return Started(request_id, model, params, first, outputs, release, images, tools)

    async def _create(self, req: ChatCompletionRequest, tracker: RequestTracker, cache_salt: str) -> Response:
        run = await self.start(req, cache_salt)
        writer = ChunkWriter(run.request_id, int(time.time()), run.model)
        n = run.params.n
        if req.stream:
            events = stream_events(
                writer, n, req.include_usage, run.first, run.outputs, tracker, run.images, run.tools
            )
            return EngineStreamResponse(
                events,
                on_close=run.release,
                send_timeout_s=self._settings.stream_send_timeout_s,
                on_send_timeout=self._metrics.slow_client,
            )
        try:
            completion = await collect(writer, n, run.first, run.outputs, tracker, run.images, run.tools)
        finally:
            await run.release()
        return await json_response(completion)

    def check_ready(self) -> None:
        if self._engine.health != "ready":
            raise ServiceUnavailableError(
                "The engine is not ready; retry shortly.", code="engine_unavailable"
            )

    async def cut_all(self, error: Exception) -> int:
        """End every request in flight with `error` (the drain deadline); returns how many."""
        cut = list(self.inflight)
        for request_id in cut:
            await self._engine.abort(request_id, error)
        return len(cut)


# Answers with more tokens than this are serialized on a worker thread: a 32-prompt echo with
# logprobs is a hundred megabytes of JSON, seconds the event loop (and /health) would wait.
LARGE_ANSWER_TOKENS = 4096


async def json_response(body: ChatCompletion | Completion | ResponseObject) -> Response:
    """`body` as a JSON response. A large one is serialized off the event loop, item by item, and
    sent in slices: a 180 MB answer (32 scored prompts) written in one piece held the event loop
    for up to 2 s while the transport copied it."""
    if body.usage is None or body.usage.total_tokens <= LARGE_ANSWER_TOKENS:
        return Response(body.model_dump_json(), media_type="application/json")
    pieces = await anyio.to_thread.run_sync(lambda: [piece.encode() for piece in json_pieces(body)])
    size = sum(len(piece) for piece in pieces)

    async def slices() -> AsyncIterator[bytes]:
        for piece in pieces:
            for start in range(0, len(piece), SEND_SLICE_BYTES):
                yield piece[start : start + SEND_SLICE_BYTES]
        pieces.clear()

    return StreamingResponse(slices(), media_type="application/json", headers={"Content-Length": str(size)})


# Large answers go to the transport this much at a time: the event loop copies each slice once.
SEND_SLICE_BYTES = 1 << 20


def json_pieces(body: BaseModel, exclude: set[str] | None = None) -> Iterator[str]:
    """body.model_dump_json(exclude=exclude) in pieces, its top-level lists of objects (choices,
    output items) serialized one item at a time. pydantic holds the GIL for the whole of one dump
    (0.13 s for 18 MB here), so even on a worker thread one dump of a 180 MB answer would stall the
    event loop for a second; item by item, the loop waits for one item at most. Those lists come
    last in the object. A generator: the caller encodes each piece before the next is made."""
    exclude = exclude or set()
    lists = {
        name: value
        for name, value in body
        if name not in exclude and isinstance(value, list) and value and isinstance(value[0], BaseModel)
    }
    shell = body.model_dump_json(exclude=exclude | set(lists))
    yield shell[:-1]
    first = shell == "{}"
    for name, items in lists.items():
        yield f'{"" if first else ","}"{name}":['
        first = False
        for index, item in enumerate(items):
            yield ("," if index else "") + item.model_dump_json()
        yield "]"
    yield "}"


def dump_in_pieces(body: BaseModel, exclude: set[str] | None = None) -> str:
    """json_pieces, joined."""
    return "".join(json_pieces(body, exclude))


async def from_first(
    first: RequestOutput, outputs: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs from the already-awaited `first` on, up to the finished one."""
    out = first
    while True:
        yield out
        if out.finished:
            return
        try:
            out = await anext(outputs)
        except StopAsyncIteration:
            return


async def collect(
    writer: ChunkWriter,
    n: int,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
    tracker: RequestTracker,
    images: Sequence[bytes] = (),
    tool_format: ToolFormat | None = None,
) -> ChatCompletion:
    """Drain the engine into one ChatCompletion; a failure raises (-> an error status)."""
    builder = CompletionBuilder(writer, n, images, tool_format)
    out = first
    async for out in from_first(first, outputs):
        tracker.on_output(out)
        builder.add(out)
    completion = builder.build()
    tracker.finished(out, [c.finish_reason for c in completion.choices])
    return completion


async def stream_events(
    writer: ChunkWriter,
    n: int,
    include_usage: bool,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
    tracker: RequestTracker,
    images: Sequence[bytes] = (),
    tool_format: ToolFormat | None = None,
) -> AsyncIterator[str]:
    """OpenAI's sequence: role chunk per choice, content deltas, finish chunks, usage chunk, [DONE].

    A failure after the headers went out becomes an error event followed by [DONE].
    """
    state = StreamState(writer, n, images, tool_format)
    try:
        for index in range(n):
            yield writer.role(index)
        out = first
        async for out in from_first(first, outputs):
            tracker.on_output(out)
            for event in state.events_for(out):
                yield event
        for event in state.close():
            yield event
        tracker.finished(out, state.finish_reasons())
        if include_usage:
            yield writer.usage(out)
    except Exception as exc:
        err = to_api_error(exc)
        tracker.failed(err.code or err.error_type)
        yield writer.error(err)
    except (asyncio.CancelledError, GeneratorExit):
        tracker.failed(DISCONNECTED)  # the client left (or the drain timed out): nothing more to send
        raise
    finally:
        await close_quietly(outputs)
    yield writer.done()


# ---------------------------------------------------------------------------------------------
# Disconnects and cleanup.


async def close_quietly(outputs: AsyncIterator[RequestOutput]) -> None:
    """Close the engine's generator (which aborts the request), even inside a cancelled scope."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            logger.exception("closing the engine stream failed")


class SlowClientError(Exception):
    """A streaming client stopped reading for longer than stream_send_timeout_s."""


class EngineStreamResponse(StreamingResponse):
    """A StreamingResponse that closes the engine stream on every exit, even if it never started,
    and gives up on a client that stops reading: a send blocked (the socket's buffers full) for
    `send_timeout_s` ends the response and aborts the request. Until then its request is paused
    by the worker once PAUSE_AT_OUTPUTS outputs wait, so nothing piles up."""

    def __init__(
        self,
        content: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]],
        *,
        send_timeout_s: float | None = None,
        on_send_timeout: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._send_timeout_s = send_timeout_s
        self._on_send_timeout = on_send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self._send_timeout_s

        async def bounded_send(message: ASGIMessage) -> None:
            with anyio.move_on_after(timeout) as deadline:
                await send(message)
            if deadline.cancelled_caught:
                raise SlowClientError

        try:
            await super().__call__(scope, receive, send if timeout is None else bounded_send)
        except SlowClientError:
            logger.warning("client read nothing for %.0f s; stream closed and request aborted", timeout)
            if self._on_send_timeout is not None:
                self._on_send_timeout()
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """Run `work`, cancelling it if the client disconnects first (so the engine aborts at once)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException as exc:  # the work's own cancellation, or an error it raised on the way out
        if not isinstance(exc, asyncio.CancelledError):
            logger.debug("request ended with %s after the client left", type(exc).__name__)
    logger.info("client disconnected; request cancelled")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
