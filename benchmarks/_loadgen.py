"""The load-generator half of benchmarks/serve.py: workloads, the streaming client, runs and the report.

Nothing here starts a server or imports torch: it drives an OpenAI-compatible base URL with streaming
`/v1/chat/completions` requests and measures what comes back.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

WORKLOADS = ("text", "image", "multi-image", "video")
# (width, height, format): the image workload cycles through these, so a run mixes sizes up to 4K.
IMAGE_SIZES: tuple[tuple[int, int, str], ...] = (
    (640, 480, "PNG"),
    (1280, 720, "JPEG"),
    (1920, 1080, "JPEG"),
    (3840, 2160, "JPEG"),
)
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 16, 8, (320, 240)
QUESTIONS = (
    "Please describe the scene in detail, including the colors, the objects and what the people are doing.",
    "Tell me a long story about a red panda who lives in a bamboo forest and wants to see the sea one day.",
    "Write a poem about the quick brown fox that jumps over the lazy dog, in the style of a sonnet please.",
    "Explain step by step how a vision language model turns the pixels of an image into words and answers.",
)
ERROR_CHARS = 300  # error texts are cut to this length in the report


# --- workloads --------------------------------------------------------------------------------------


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def synthetic_image(seed: int, index: int, width: int, height: int, fmt: str) -> bytes:
    """A smooth random gradient with fine noise on top, encoded as `fmt`; unique per (seed, index).

    Distinct bytes per request keep any server-side image cache from hitting; the noise gives the
    decoder and the resize real work, as a photo would.
    """
    rng = np.random.default_rng([seed, index])
    coarse = rng.integers(0, 256, size=(9, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.int16)
    noise = rng.integers(-16, 17, size=(256, 256, 3), dtype=np.int16)
    tiled = np.tile(noise, (math.ceil(height / 256), math.ceil(width / 256), 1))[:height, :width]
    pixels = np.clip(base + tiled, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def synthetic_video(seed: int, index: int) -> bytes:
    """A short MP4 (H.264 where PyAV has it, else MPEG-4 part 2) of a drifting gradient."""
    import av  # imported here: only the video workload needs PyAV

    rng = np.random.default_rng([seed, index])
    width, height = VIDEO_SIZE
    ys, xs = np.mgrid[0:height, 0:width]
    color = rng.integers(0, 256, size=3)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(VIDEO_FRAMES):
            wave = ((xs + ys + 8 * t) % 256).astype(np.uint8)
            planes = [wave, np.full_like(wave, color[1]), (wave // 2 + color[2]) % 256]
            frame = np.stack(planes, axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _image_part(seed: int, index: int, size_index: int) -> dict[str, Any]:
    width, height, fmt = IMAGE_SIZES[size_index % len(IMAGE_SIZES)]
    data = synthetic_image(seed, index, width, height, fmt)
    return {"type": "image_url", "image_url": {"url": _data_uri(data, f"image/{fmt.lower()}")}}


def build_messages(workload: str, index: int, seed: int) -> list[dict[str, Any]]:
    """The `messages` of request `index` of `workload` (deterministic in seed and index)."""
    question = QUESTIONS[index % len(QUESTIONS)]
    if workload == "text":
        parts: list[dict[str, Any]] = []
    elif workload == "image":
        parts = [_image_part(seed, index, index)]
    elif workload == "multi-image":
        count = 2 + index % 2
        parts = [_image_part(seed, index * 8 + k, index + k) for k in range(count)]
    elif workload == "video":
        video = _data_uri(synthetic_video(seed, index), "video/mp4")
        parts = [{"type": "video_url", "video_url": {"url": video}}]
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@dataclass(frozen=True)
class RequestOptions:
    """What a server gets beyond the messages: which optional fields it accepts is probed per server."""

    model: str | None
    max_tokens: int
    include_usage: bool = True
    ignore_eos: bool = True


def encode_body(messages: list[dict[str, Any]], options: RequestOptions) -> bytes:
    """The JSON body of a greedy streaming request, encoded once before a run so that it is not timed."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": options.max_tokens, "stream": True}
    body["temperature"] = 0.0
    if options.model is not None:
        body["model"] = options.model
    if options.include_usage:
        body["stream_options"] = {"include_usage": True}
    if options.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


# --- one streaming request ------------------------------------------------------------------------


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    tokens_from_usage: bool = False


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` payloads of a server-sent-event stream; a stream may end with or without `[DONE]`."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


async def stream_chat(client: httpx.AsyncClient, url: str, body: bytes) -> RequestResult:
    """Send one streaming chat request and time its content deltas."""
    result = RequestResult()
    deltas = 0
    start = last = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, content=body, headers={"content-type": "application/json"}
        ) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                result.error = _short(f"HTTP {resp.status_code}: {text}")
                return result
            async for payload in sse_data(resp.aiter_lines()):
                if payload.strip() == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    result.error = _short(f"malformed SSE data: {payload}")
                    return result
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    result.error = _short(
                        f"error in stream: {json.dumps(event['error'], ensure_ascii=False)}"
                    )
                    return result
                usage = event.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    result.output_tokens = int(usage["completion_tokens"])
                    result.tokens_from_usage = True
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        deltas += 1
    except httpx.HTTPError as exc:
        result.error = _short(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        return result
    finally:
        result.latency = time.perf_counter() - start
    if not result.tokens_from_usage:
        result.output_tokens = deltas
    result.ok = True
    return result


# --- one run: many requests at a concurrency or a Poisson rate --------------------------------------


@dataclass(frozen=True)
class Load:
    """How requests are sent: at most `concurrency` in flight, and/or Poisson arrivals at `rate`/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate:g} req/s")
        if self.concurrency is not None:
            parts.append(f"c={self.concurrency}" if self.rate is None else f"≤{self.concurrency} in flight")
        return ", ".join(parts) or "all at once"


async def run_load(
    url: str,
    bodies: Sequence[bytes],
    load: Load,
    *,
    run_timeout_s: float,
    request_timeout_s: float,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Send every body under `load`; returns the results and the run's wall time.

    Bounded: a request is cut at `request_timeout_s`, the run at `run_timeout_s` (requests not
    finished or not yet sent by then count as failed).
    """
    in_flight = load.concurrency or len(bodies)
    limits = httpx.Limits(max_connections=in_flight + 1, max_keepalive_connections=in_flight + 1)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    gate = asyncio.Semaphore(in_flight)
    arrivals = random.Random(seed)

    async def one(client: httpx.AsyncClient, body: bytes) -> RequestResult:
        async with gate:
            try:
                return await asyncio.wait_for(stream_chat(client, url, body), request_timeout_s)
            except asyncio.TimeoutError:
                return RequestResult(
                    error=f"no complete answer within the request timeout of {request_timeout_s:g} s"
                )

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        start = time.perf_counter()
        deadline = start + run_timeout_s
        tasks: list[asyncio.Task[RequestResult]] = []
        for body in bodies:
            if load.rate is not None and tasks:
                await asyncio.sleep(
                    min(arrivals.expovariate(load.rate), max(0.0, deadline - time.perf_counter()))
                )
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(client, body)))
        pending: set[asyncio.Task[RequestResult]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    late = RequestResult(error=f"not finished within the run timeout of {run_timeout_s:g} s")
    results = [late if t in pending else _outcome(t) for t in tasks]
    results += [late] * (len(bodies) - len(tasks))
    return results, wall


def _outcome(task: asyncio.Task[RequestResult]) -> RequestResult:
    exc = task.exception()
    return task.result() if exc is None else RequestResult(error=_short(f"client error: {exc!r}"))


# --- summaries and the report ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean, median and 99th percentile of a latency, in seconds; NaN when nothing was measured."""

    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls(math.nan, math.nan, math.nan)
        arr = np.asarray(values, dtype=np.float64)
        return cls(float(arr.mean()), float(np.percentile(arr, 50)), float(np.percentile(arr, 99)))

    def cell(self, scale: float, digits: int) -> str:
        if math.isnan(self.mean):
            return "–"
        return " / ".join(f"{v * scale:.{digits}f}" for v in (self.mean, self.p50, self.p99))


@dataclass(frozen=True)
class Summary:
    """One row of the report: one server, one workload, one load."""

    server: str
    workload: str
    load: Load
    completed: int
    failed: int
    first_error: str | None
    wall_s: float
    request_throughput: float
    output_throughput: float
    tokens_per_request: float
    tokens_from_usage: bool
    ttft: Stat
    itl: Stat
    e2e: Stat

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("load", "ttft", "itl", "e2e")}
        out["load"] = {"concurrency": self.load.concurrency, "rate": self.load.rate}
        for name in ("ttft", "itl", "e2e"):
            out[f"{name}_s"] = getattr(self, name).__dict__
        return out


def summarize(
    server: str, workload: str, load: Load, results: Sequence[RequestResult], wall_s: float
) -> Summary:
    done = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok and r.error]
    tokens = sum(r.output_tokens for r in done)
    return Summary(
        server=server,
        workload=workload,
        load=load,
        completed=len(done),
        failed=len(results) - len(done),
        first_error=errors[0] if errors else None,
        wall_s=wall_s,
        request_throughput=len(done) / wall_s if wall_s > 0 else 0.0,
        output_throughput=tokens / wall_s if wall_s > 0 else 0.0,
        tokens_per_request=tokens / len(done) if done else 0.0,
        tokens_from_usage=bool(done) and all(r.tokens_from_usage for r in done),
        ttft=Stat.of([r.ttft for r in done if r.ttft is not None]),
        itl=Stat.of([gap for r in done for gap in r.itl]),
        e2e=Stat.of([r.latency for r in done]),
    )


COLUMNS = (
    "server",
    "workload",
    "load",
    "ok / failed",
    "req/s",
    "out tok/s",
    "tok/req",
    "TTFT ms mean / p50 / p99",
    "ITL ms mean / p50 / p99",
    "E2E s mean / p50 / p99",
)


def markdown_table(rows: Sequence[Summary]) -> str:
    """The report as a Markdown table, failures listed under it with their first error."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in rows:
        mark = "" if s.tokens_from_usage else "†"
        cells = (
            s.server,
            s.workload,
            s.load.label,
            f"{s.completed} / {s.failed}",
            f"{s.request_throughput:.2f}",
            f"{s.output_throughput:.1f}{mark}",
            f"{s.tokens_per_request:.1f}{mark}",
            s.ttft.cell(1000, 0),
            s.itl.cell(1000, 1),
            s.e2e.cell(1, 2),
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {s.server} / {s.workload} / {s.load.label}: {s.first_error}" for s in rows if s.first_error]
    if any(not s.tokens_from_usage and s.completed for s in rows):
        notes.append("- †: no usage chunk came back; tokens counted as content deltas (a lower bound).")
    return "\n".join(lines + ([""] + notes if notes else []))
