"""A minimal OpenAI-compatible server over the model cards' `model.chat()` path, one request at a time.

The baseline of benchmarks/serve.py: what a user gets by wrapping the card's code in FastAPI. Media
is preprocessed with the reference algorithm (our `load_image`/`load_video` are bit-identical to the
card's), the prompt is built as `chat()` builds it, and `model.generate()` runs under one global
lock, streaming through `TextIteratorStreamer` from a second thread as the card shows. No batching,
no queue limits, no URL fetching (data: URIs only): a benchmark peer, not a product.

    python benchmarks/baseline_server.py --model DIR_ORIGINAL_LAYOUT --port 8012
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from model_runtime.config import EngineConfig
from model_runtime.inputs.image import load_image
from model_runtime.inputs.templates import render
from model_runtime.inputs.video import load_video
from model_runtime.loading.checkpoint import LoadedCheckpoint, load_checkpoint

log = logging.getLogger("baseline_server")
IMG_START, IMG_CONTEXT, IMG_END = "<img>", "<IMG_CONTEXT>", "</img>"
DEFAULT_MAX_TOKENS = 1024  # the cards' generation_config


class BadRequest(Exception):
    """A request this server cannot serve; answered with a 400."""


@dataclass
class Media:
    """Decoded media of the last user message, in the order the card's prompt names them."""

    pixel_values: torch.Tensor | None = None
    num_patches_list: list[int] = field(default_factory=list)
    prefix: str = ""


@dataclass
class Job:
    """One request: its inputs, and the channel its text and end come back through."""

    question: str
    history: list[tuple[str, str]]
    system_message: str | None
    parts: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def push(self, item: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _data_uri_bytes(url: str) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("the baseline server accepts media only as data:...;base64, URIs")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("media data URI is not valid base64") from None


class ChatModel:
    """The card's `model.chat()`, on our loaded checkpoint, one request at a time."""

    def __init__(self, loaded: LoadedCheckpoint, frames_per_video: int) -> None:
        self.loaded = loaded
        self.frames_per_video = frames_per_video
        self.lock = threading.Lock()

    def _media(self, parts: list[dict[str, Any]]) -> Media:
        tensors: list[torch.Tensor] = []
        media = Media()
        images = sum(1 for p in parts if p["type"] == "image_url")
        for part in parts:
            if part["type"] == "image_url":
                pixels = load_image(
                    _data_uri_bytes(part["image_url"]["url"]),
                    max_tiles=self.loaded.max_tiles,
                    min_tiles=self.loaded.min_tiles,
                    image_size=self.loaded.image_size,
                    use_thumbnail=self.loaded.use_thumbnail,
                )
                tensors.append(pixels)
                media.num_patches_list.append(pixels.shape[0])
                if images > 1 or len(parts) > 1:  # the card's multi-image form: one <image> per image
                    media.prefix += f"Image-{len(tensors)}: <image>\n"
            elif part["type"] == "video_url":
                pixels, per_frame = load_video(
                    _data_uri_bytes(part["video_url"]["url"]),
                    num_frames=self.frames_per_video,
                    max_tiles_per_frame=1,
                    image_size=self.loaded.image_size,
                    use_thumbnail=self.loaded.use_thumbnail,
                )
                tensors.append(pixels)
                media.num_patches_list.extend(per_frame)
                media.prefix += "".join(f"Frame{i + 1}: <image>\n" for i in range(len(per_frame)))
        if tensors:
            media.pixel_values = torch.cat(tensors).to(self.loaded.device, self.loaded.dtype)
        return media

    def _prompt(self, job: Job, media: Media) -> str:
        """`chat()`'s prompt: `<image>` prefix, template with history, each `<image>` expanded in order."""
        question = media.prefix + job.question
        if not job.history and media.pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        template = self.loaded.template
        turns: list[tuple[str, str | None]] = []
        for old_question, old_answer in job.history:
            turns += [(template.user_role, old_question), (template.assistant_role, old_answer)]
        turns += [(template.user_role, question), (template.assistant_role, None)]
        query = render(template, job.system_message, turns)
        for num_patches in media.num_patches_list:
            tokens = IMG_START + IMG_CONTEXT * (self.loaded.tokens_per_tile * num_patches) + IMG_END
            query = query.replace("<image>", tokens, 1)
        return query

    def _generate(self, job: Job, media: Media, streamer: TextIteratorStreamer) -> None:
        loaded = self.loaded
        try:
            inputs = loaded.tokenizer(self._prompt(job, media), return_tensors="pt").to(loaded.device)
            config = copy.deepcopy(loaded.model.generation_config)
            config.max_new_tokens = job.max_tokens
            config.do_sample = job.temperature > 0
            if config.do_sample:
                config.temperature, config.top_p = job.temperature, job.top_p
            stop_id = loaded.tokenizer.convert_tokens_to_ids(loaded.template.stop_str)
            config.eos_token_id = stop_id
            if job.ignore_eos:  # generate() refills a None eos from the model's config: suppress it instead
                config.min_new_tokens = job.max_tokens
            config.pad_token_id = (
                loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else stop_id
            )
            if media.pixel_values is not None:  # an explicit None would send generate() to the vision tower
                inputs["pixel_values"] = media.pixel_values
            with torch.inference_mode():
                output = loaded.model.generate(
                    **inputs,
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancelled)]),
                )
            job.prompt_tokens = int(inputs["input_ids"].shape[1])
            job.completion_tokens = int(output.shape[1]) - job.prompt_tokens
        except Exception as exc:  # noqa: BLE001 - reported to the client as an error chunk
            log.exception("generation failed")
            job.error = f"generation failed: {type(exc).__name__}"
            streamer.end()

    def serve(self, job: Job) -> None:
        """Run in a thread of its own: wait for the lock, then do what the card's streaming example does."""
        try:
            with self.lock:
                if job.cancelled.is_set():
                    return
                try:
                    media = self._media(job.parts)
                except BadRequest as exc:
                    job.error = str(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - undecodable media
                    log.exception("cannot read media")
                    job.error = f"cannot read media: {type(exc).__name__}"
                    return
                streamer = TextIteratorStreamer(
                    self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True
                )
                thread = threading.Thread(target=self._generate, args=(job, media, streamer), daemon=True)
                thread.start()
                for text in streamer:
                    if text:
                        job.push(text)
                thread.join()
        finally:
            job.push(None)


# --- HTTP ----------------------------------------------------------------------------------------


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _text_of(content: Any) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts")
    texts, media = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "video_url"):
            value = part[kind]
            media.append({"type": kind, kind: {"url": value} if isinstance(value, str) else value})
        else:
            raise BadRequest(f"unsupported content part type {kind!r}")
    return "\n".join(texts), media


def parse_job(body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
    """Messages -> the card's (question, history, system message); media only in the last user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    system, turns = [], []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        text, media = _text_of(message.get("content") if isinstance(message, dict) else None)
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append((role, text, media))
        else:
            raise BadRequest(f"unsupported role {role!r}")
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must be a user message")
    if any(media for _, _, media in turns[:-1]):
        raise BadRequest("the baseline server takes images and videos only in the last user message")
    prior = turns[:-1]
    if len(prior) % 2 or any(role != ("user", "assistant")[i % 2] for i, (role, _, _) in enumerate(prior)):
        raise BadRequest("messages must alternate user and assistant turns")
    history = [(prior[i][1], prior[i + 1][1]) for i in range(0, len(prior), 2)]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    temperature = body.get("temperature")
    return Job(
        question=turns[-1][1],
        history=history,
        system_message="\n".join(system) if system else None,
        parts=turns[-1][2],
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),
        top_p=float(body.get("top_p") or 1.0),
        ignore_eos=bool(body.get("ignore_eos", False)),
        loop=loop,
    )


def _chunk(request_id: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    event = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def _usage(job: Job) -> dict[str, int]:
    total = job.prompt_tokens + job.completion_tokens
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": total,
    }


def create_app(chat_model: ChatModel, model_name: str) -> FastAPI:
    app = FastAPI(title="model.chat() baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "baseline"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
            job = parse_job(body, asyncio.get_running_loop())
        except (BadRequest, ValueError, TypeError, KeyError) as exc:
            return _error(400, str(exc) if isinstance(exc, BadRequest) else "malformed request body")
        if body.get("model") not in (None, model_name):
            return _error(404, f"The model {body.get('model')!r} does not exist.", "model")
        threading.Thread(target=chat_model.serve, args=(job,), daemon=True).start()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _stream(job, request_id, model_name, include_usage), media_type="text/event-stream"
            )
        return await _complete(job, request_id, model_name)

    return app


def _finish_reason(job: Job) -> str:
    return "length" if job.completion_tokens >= job.max_tokens else "stop"


async def _stream(job: Job, request_id: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _chunk(request_id, model, {"role": "assistant", "content": ""})
        while (text := await job.queue.get()) is not None:
            yield _chunk(request_id, model, {"content": text})
        if job.error:
            yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
        else:
            yield _chunk(request_id, model, {}, _finish_reason(job))
            if include_usage:
                event = {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": _usage(job),
                }
                yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once finished; stops generation when the client went away


async def _complete(job: Job, request_id: str, model: str) -> Response:
    pieces = []
    try:
        while (text := await job.queue.get()) is not None:
            pieces.append(text)
    finally:
        job.cancelled.set()
    if job.error:
        return _error(500 if job.error.startswith("generation") else 400, job.error)
    message = {"role": "assistant", "content": "".join(pieces).strip()}
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(job)}
            ],
            "usage": _usage(job),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (original or -hf layout)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    parser.add_argument("--served-model-name", default=None, help="default: the directory's name")
    parser.add_argument(
        "--frames-per-video", type=int, default=8, help="num_segments of the card's load_video"
    )
    args = parser.parse_args(argv)
    loaded = load_checkpoint(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    name = args.served_model_name or Path(args.model).name
    app = create_app(ChatModel(loaded, args.frames_per_video), name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
