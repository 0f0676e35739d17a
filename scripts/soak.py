"""Soak the real server: many streaming requests, mixed text/image/video, clients leaving mid-stream.

    python -m scripts.soak --count 300 --concurrency 32          # starts its own tiny server
    python -m scripts.soak --base-url http://127.0.0.1:8000 --pid 1234   # an already running one

Prints the figures the README's reliability section quotes: requests served, disconnects survived,
errors, resident memory and threads before/after, and the engine gauges once the run is over.
Exits 1 if any request that was not abandoned got a malformed or failed stream, or if the gauges
do not return to zero. Loopback only: it refuses any other host. Run from the repository root
(it uses the test helpers in `tests/`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SETTLE_S = 5.0  # how long the gauges may take to return to zero after the last request
TOKENS_PER_TILE = 256


@dataclass(frozen=True)
class SoakConfig:
    """What to send: how many requests, how many at once, how many clients leave early."""

    count: int = 300
    concurrency: int = 32
    disconnect_ratio: float = 0.25
    seed: int = 0
    duration_s: float | None = None  # stop starting new requests after this long
    max_tokens: tuple[int, int] = (8, 64)
    request_timeout_s: float = 120.0


@dataclass
class SoakReport:
    """Counts from one run; `errors` describes every request that went wrong."""

    started: int = 0
    served: int = 0  # complete, well-formed streams
    abandoned: int = 0  # clients that left mid-stream on purpose
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class ProcessSnapshot:
    rss_bytes: int
    threads: int
    fds: int


def snapshot(pid: int) -> ProcessSnapshot:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ProcessSnapshot(
        rss, len(list(Path(f"/proc/{pid}/task").iterdir())), len(list(Path(f"/proc/{pid}/fd").iterdir()))
    )


class Media:
    """Data URIs sent by the soak: a few small images (one tile each) and a short video."""

    def __init__(self) -> None:
        from tests.server_process import data_uri, image_bytes, mp4_bytes

        self.images = [
            data_uri("image/png", image_bytes(48, 48, seed=1)),
            data_uri("image/jpeg", image_bytes(64, 64, fmt="JPEG", seed=2)),
            data_uri("image/webp", image_bytes(56, 56, fmt="WEBP", seed=3)),
        ]
        self.wide = data_uri("image/png", image_bytes(96, 48, seed=4))  # 2x1 grid + thumbnail
        self.video = data_uri("video/mp4", mp4_bytes(frames=12, width=64, height=48))


def build_request(
    rng: random.Random, media: Media, config: SoakConfig, model: str
) -> tuple[str, dict[str, Any]]:
    """(kind, body) of one streaming request."""
    roll = rng.random()
    text = {
        "type": "text",
        "text": rng.choice(["Describe it.", "What is in the picture?", "Tell me a story."]),
    }
    if roll < 0.4:
        kind, parts = "text", [text]
    elif roll < 0.75:
        kind = "image"
        images = [
            {"type": "image_url", "image_url": {"url": rng.choice(media.images)}}
            for _ in range(rng.choice([1, 1, 2]))
        ]
        if rng.random() < 0.2:
            images.append({"type": "image_url", "image_url": {"url": media.wide, "max_dynamic_patch": 2}})
        parts = [*images, text]
    else:
        kind = "video"
        parts = [
            {"type": "video_url", "video_url": {"url": media.video, "num_frames": rng.choice([2, 4, 8])}},
            text,
        ]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": rng.randint(*config.max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": True,
        "ignore_eos": rng.random() < 0.5,
    }
    if rng.random() < 0.15:
        body["n"] = 2
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return kind, body


def check_stream(events: list[Any], body: dict[str, Any]) -> str | None:
    """None if `events` is OpenAI's sequence for `body`; otherwise what is wrong."""
    if not events or events[-1] != "[DONE]":
        return "the stream did not end with [DONE]"
    chunks = events[:-1]
    if any(not isinstance(c, dict) or "error" in c for c in chunks):
        return f"error event: {next(c for c in chunks if not isinstance(c, dict) or 'error' in c)}"
    if len({c.get("id") for c in chunks}) != 1:
        return "chunks carry different ids"
    n = body.get("n", 1)
    include_usage = body.get("stream_options", {}).get("include_usage", False)
    usage = chunks.pop() if include_usage else None
    if usage is not None and (usage["choices"] != [] or not usage.get("usage")):
        return f"the last chunk is not a usage chunk: {usage}"
    roles: set[int] = set()
    finished: dict[int, str] = {}
    tokens_seen = 0
    for chunk in chunks:
        if chunk.get("usage") is not None:
            return "usage on a chunk that is not the last"
        for choice in chunk["choices"]:
            index, delta = choice["index"], choice["delta"]
            if index in finished:
                return f"choice {index} continued after its finish_reason"
            if delta.get("role") == "assistant":
                if index in roles:
                    return f"choice {index} sent its role twice"
                roles.add(index)
            elif index not in roles:
                return f"choice {index} sent content before its role"
            tokens_seen += bool(delta.get("content"))
            if choice.get("finish_reason") is not None:
                if choice["finish_reason"] not in ("stop", "length"):
                    return f"finish_reason {choice['finish_reason']!r}"
                finished[index] = choice["finish_reason"]
    if roles != set(range(n)) or set(finished) != set(range(n)):
        return f"choices with a role {sorted(roles)}, with a finish_reason {sorted(finished)}; expected {n}"
    if usage is not None:
        completion = usage["usage"]["completion_tokens"]
        if not 0 < completion <= n * body["max_tokens"] or completion < tokens_seen:
            return f"usage.completion_tokens {completion} for {tokens_seen} content chunks"
    return None


async def one_request(
    client: httpx.AsyncClient, body: dict[str, Any], leave_after: int | None, timeout_s: float
) -> tuple[str, str | None]:
    """('served' | 'abandoned' | 'error', problem)."""
    events: list[Any] = []

    async def read() -> str | None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    return f"not an SSE data line: {line[:200]!r}"
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
                if leave_after is not None and len(events) >= leave_after and data != "[DONE]":
                    return None  # the client walks away mid-stream: leaving the block closes the connection
        return check_stream(events, body)

    try:
        problem = await asyncio.wait_for(read(), timeout_s)
    except (httpx.HTTPError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    if problem:
        return "error", problem
    return ("abandoned", None) if leave_after is not None and events[-1:] != ["[DONE]"] else ("served", None)


def served_model(base_url: str) -> str:
    """The first name the server answers to: requests must name their model, as OpenAI's do."""
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        response = client.get("/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


async def soak(base_url: str, config: SoakConfig, media: Media | None = None) -> SoakReport:
    """Send `config.count` streaming requests, at most `config.concurrency` at once."""
    require_loopback(base_url)
    media = media or Media()
    rng = random.Random(config.seed)
    model = served_model(base_url)
    plan = []
    for _ in range(config.count):
        kind, body = build_request(rng, media, config, model)
        leave_after = rng.randint(2, 4) if rng.random() < config.disconnect_ratio else None
        plan.append((kind, body, leave_after))
    report = SoakReport()
    queue: asyncio.Queue[tuple[str, dict[str, Any], int | None]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    started = time.monotonic()
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)

    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=config.request_timeout_s, trust_env=False
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                if config.duration_s is not None and time.monotonic() - started > config.duration_s:
                    return
                kind, body, leave_after = queue.get_nowait()
                report.started += 1
                report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
                outcome, problem = await one_request(client, body, leave_after, config.request_timeout_s)
                if outcome == "served":
                    report.served += 1
                elif outcome == "abandoned":
                    report.abandoned += 1
                else:
                    report.errors.append(f"{kind}: {problem}")

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    report.elapsed_s = time.monotonic() - started
    return report


def gauges(base_url: str) -> dict[str, float]:
    from tests.server_process import metric_values

    text = httpx.get(f"{base_url}/metrics", timeout=10, trust_env=False).text
    values = metric_values(text)
    return {
        name: values[f"internvl:{name}"]
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    }


def settled_gauges(base_url: str, within_s: float = SETTLE_S) -> dict[str, float]:
    """The gauges once they read zero, or as they are after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        values = gauges(base_url)
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def require_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"soak: refusing {base_url}: only loopback servers ({', '.join(LOOPBACK)})")


def warm_up(base_url: str, media: Media) -> None:
    """One request of each kind, so that lazily loaded codecs and pools are not counted as growth."""
    config = SoakConfig(count=6, concurrency=3, disconnect_ratio=0.0, seed=99)
    report = asyncio.run(soak(base_url, config, media))
    if report.errors:
        raise SystemExit(f"soak: warm-up failed: {report.errors[:3]}")


def format_report(report: SoakReport, before: ProcessSnapshot | None, after: ProcessSnapshot | None,
                  final: dict[str, float], healthy: bool) -> str:  # fmt: skip
    mib = 2**20
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(report.by_kind.items()))
    rate = report.started / max(report.elapsed_s, 1e-9)
    lines = [
        f"requests started        {report.started} ({kinds})",
        f"requests served         {report.served} (complete, well-formed streams ending in [DONE])",
        f"disconnects survived    {report.abandoned}",
        f"errors                  {len(report.errors)}",
        f"elapsed                 {report.elapsed_s:.1f} s ({rate:.1f} requests/s)",
    ]
    if before and after:
        lines += [
            f"RSS before / after      {before.rss_bytes / mib:.1f} MiB / {after.rss_bytes / mib:.1f} MiB",
            f"RSS growth              {(after.rss_bytes - before.rss_bytes) / mib:+.1f} MiB",
            f"threads before / after  {before.threads} / {after.threads}",
            f"open fds before / after {before.fds} / {after.fds}",
        ]
    lines += [
        "final gauges            " + ", ".join(f"{k}={v:g}" for k, v in final.items()),
        f"/health afterwards      {'200' if healthy else 'NOT 200'}",
    ]
    lines += [f"  error: {e}" for e in report.errors[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=300, help="requests to send (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    parser.add_argument(
        "--disconnect-ratio", type=float, default=0.25, help="share of clients leaving mid-stream"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop starting requests after this many s"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--base-url", default=None, help="soak a running server (loopback) instead of starting one"
    )
    parser.add_argument(
        "--pid", type=int, default=None, help="that server's pid, for memory and thread figures"
    )
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: a tiny random one)")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.count <= 1_000_000:
        parser.error("--count must be 1..1000000 and --concurrency 1..1024")
    config = SoakConfig(args.count, args.concurrency, args.disconnect_ratio, args.seed, args.duration)

    from tests.server_process import LEAN_FLAGS, ServerProcess

    server: ServerProcess | None = None
    with tempfile.TemporaryDirectory(prefix="internvl-soak-") as tmp:
        if args.base_url:
            base_url, pid = args.base_url.rstrip("/"), args.pid
            require_loopback(base_url)
        else:
            model = args.model
            if model is None:
                from model_runtime.loading.tiny import write_tiny_checkpoint

                model = str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
            server = (
                ServerProcess(model, Path(tmp) / "server", args=LEAN_FLAGS, threads=2).start().wait_healthy()
            )
            base_url, pid = server.base_url, server.pid
        try:
            media = Media()
            warm_up(base_url, media)
            before = snapshot(pid) if pid else None
            report = asyncio.run(soak(base_url, config, media))
            final = settled_gauges(base_url)
            after = snapshot(pid) if pid else None
            healthy = httpx.get(f"{base_url}/health", timeout=10, trust_env=False).status_code == 200
            print(format_report(report, before, after, final, healthy))
        finally:
            if server is not None:
                code = server.stop()
                print(f"server exit code        {code}")
    ok = not report.errors and not any(final.values()) and healthy
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
