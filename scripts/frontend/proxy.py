"""A logging pass-through proxy between the chat frontend and internvl-serve.

Every request is forwarded unchanged (streams included) and one JSON line per exchange is appended to
the log: method, path, the request body (data: URIs shortened to their media type and size), the
response status and the response body (for a stream: every SSE `data:` payload, in order).
`check_log.py` reads that file to decide whether the chat worked; it is also the exact record of what
the frontend sent, should a frontend and the server disagree.

    python proxy.py --upstream http://127.0.0.1:8000 --port 8001 --log exchanges.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

DATA_URI = re.compile(r"^data:([^;,]*)(;base64)?,(.*)$", re.S)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


def shorten(value: Any) -> Any:
    """The body with data: URIs replaced by 'data:<type>;base64,<N chars>' so that logs stay small."""
    if isinstance(value, dict):
        return {k: shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten(v) for v in value]
    if isinstance(value, str):
        match = DATA_URI.match(value)
        if match:
            return f"data:{match.group(1)}{match.group(2) or ''},<{len(match.group(3))} chars>"
    return value


def parse_body(raw: bytes) -> Any:
    try:
        return shorten(json.loads(raw))
    except ValueError:
        return raw.decode("utf-8", "replace")[:2000]


def parse_response(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", "replace")
    if "text/event-stream" in content_type:
        events: list[Any] = []
        for line in text.splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                try:
                    events.append(json.loads(payload))
                except ValueError:
                    events.append(payload)
        return {"sse": events}
    try:
        return json.loads(text)
    except ValueError:
        return text[:2000]


def make_app(upstream: str, log_path: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(120.0, connect=5.0))

    def write(record: dict[str, Any]) -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    async def forward(request: Request) -> StreamingResponse:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        record: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.url.path,
            "request": parse_body(body) if body else None,
        }
        upstream_request = client.build_request(
            request.method, request.url.path, params=request.query_params, headers=headers, content=body
        )
        try:
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            record.update(status=502, response=f"proxy: upstream unreachable: {exc!r}")
            write(record)
            return StreamingResponse(iter([b'{"error": "upstream unreachable"}']), status_code=502)
        chunks: list[bytes] = []

        async def relay():
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                yield chunk

        async def finish() -> None:
            await response.aclose()
            raw = b"".join(chunks)
            record.update(
                status=response.status_code,
                response=parse_response(raw, response.headers.get("content-type", "")),
            )
            write(record)

        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            relay(), status_code=response.status_code, headers=out_headers, background=BackgroundTask(finish)
        )

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="JSON-lines file, appended to")
    args = parser.parse_args()
    uvicorn.run(make_app(args.upstream, args.log), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
