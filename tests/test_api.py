"""In-process API tests: the FastAPI app over a FakeEngine, driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_runtime.errors import EngineDeadError, MediaTooLargeError, PromptTooLongError, QueueFullError
from server.app import begin_drain, create_app
from server.cli import watch_engine
from server.log import RequestIdFilter
from server.media import MediaFetcher
from server.settings import Settings
from tests.app_client import MODEL, client, make_app
from tests.fakes import FAKE_INFO, IMAGE_TOKENS_PER_TILE, SECRET_DETAIL, FakeEngine, parse_sse
from tests.openapi_spec import assert_conforms

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes").decode()
MP4 = "data:video/mp4;base64," + base64.b64encode(b"fake video bytes").decode()
JSON = {"content-type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chat(text: str = "hello world", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields}


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


# -- completions ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_non_streaming_completion() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello world", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == 5
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    # The engine's id is the server's own, not anything the client sent.
    assert engine.calls[0][0] == body["id"]


@pytest.mark.anyio
async def test_streaming_framing_is_openais_sequence() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "echo:"}, None),
        ({"content": " hello"}, None),
        ({"content": " world"}, None),
        ({}, "stop"),
    ]
    assert all(c["usage"] is None for c in chunks)


@pytest.mark.anyio
async def test_stream_usage_chunk_comes_last_with_empty_choices() -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    body["messages"][0]["content"] = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": PNG}},
    ]
    async with client(make_app()) as c:
        events = parse_sse((await c.post("/v1/chat/completions", json=body)).text)
    usage_chunk = events[-2]
    assert events[-1] == "[DONE]" and usage_chunk["choices"] == []
    image_tokens = IMAGE_TOKENS_PER_TILE * FAKE_INFO.default_tiles_per_image
    assert usage_chunk["usage"]["prompt_tokens"] == 1 + image_tokens  # image tokens count as prompt
    assert usage_chunk["usage"]["prompt_tokens_details"]["image_tokens"] == image_tokens
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_n_choices_by_index_stream_and_not() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=chat("hi", n=2))
        events = parse_sse((await c.post("/v1/chat/completions", json=chat("hi", n=2, stream=True))).text)
    assert [ch["message"]["content"] for ch in r.json()["choices"]] == ["echo0: hi", "echo1: hi"]
    roles = [e["choices"][0]["index"] for e in events[:2]]
    assert roles == [0, 1] and all(e["choices"][0]["delta"]["role"] == "assistant" for e in events[:2])
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]


@pytest.mark.anyio
async def test_stop_and_length_finish_reasons() -> None:
    async with client(make_app()) as c:
        stopped = (await c.post("/v1/chat/completions", json=chat("a b c d", stop=" c"))).json()
        cut = (await c.post("/v1/chat/completions", json=chat("a b c d", max_completion_tokens=2))).json()
    assert stopped["choices"][0]["message"]["content"] == "echo: a b"
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == "echo: a"
    assert cut["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
async def test_logprobs_in_openai_shape() -> None:
    async with client(make_app()) as c:
        body = (await c.post("/v1/chat/completions", json=chat("hi", logprobs=True, top_logprobs=2))).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [item["token"] for item in content] == ["echo:", " hi"]
    assert content[1] == {
        "token": " hi",
        "logprob": -0.5,
        "bytes": list(b" hi"),
        "top_logprobs": [
            {"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")},
            {"token": "alt1", "logprob": -2.0, "bytes": list(b"alt1")},
        ],
    }


@pytest.mark.anyio
async def test_error_after_headers_is_an_error_event_then_done() -> None:
    async with client(make_app(FakeEngine(fail_after=2))) as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    events = parse_sse(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert SECRET_DETAIL not in r.text and "0x7f" not in r.text
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == ["echo:", " hello"]


@pytest.mark.anyio
async def test_unknown_fields_are_ignored() -> None:
    body = chat(user="u1", response_format={"type": "text"}, metadata={"k": "v"}, store=False, whatever=[1])
    body["messages"][0] = {
        "role": "user",
        "name": "me",
        "x": 1,
        "content": [{"type": "text", "text": "hi", "y": 2}],
    }
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_tiles_and_frames_are_clamped_before_the_engine() -> None:
    engine = FakeEngine()
    content = [
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low", "max_dynamic_patch": 1000}},
        {"type": "video_url", "video_url": {"url": MP4, "num_frames": 100000, "max_dynamic_patch": 50}},
        {"type": "text", "text": "describe"},
    ]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    async with client(make_app(engine, max_frames_per_video=32)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    parts = engine.calls[0][1].messages[0].parts
    assert [p.max_tiles for p in parts[:4]] == [
        1,
        FAKE_INFO.max_tiles_per_image,
        None,
        FAKE_INFO.max_tiles_per_image,
    ]
    assert parts[0].data == base64.b64decode(PNG.split(",")[1])
    assert (parts[4].num_frames, parts[4].max_tiles_per_frame) == (32, FAKE_INFO.max_tiles_per_image)
    assert parts[5] == "describe"


class CountingFetcher(MediaFetcher):
    """Records fetches, to show limits are enforced before any of them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.fetched: list[str] = []

    async def fetch(self, url: str, kind: Any, param: str | None = None) -> bytes:
        self.fetched.append(url)
        return b"x"


@pytest.mark.anyio
async def test_too_many_images_refused_before_any_fetch() -> None:
    settings = Settings(served_model_name=[MODEL], max_images_per_request=2)
    fetcher = CountingFetcher(settings)
    engine = FakeEngine()
    app = create_app(settings, engine, fetcher=fetcher)
    content = [{"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}} for i in range(3)]
    async with client(app) as c:
        r = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}]}
        )
    error = assert_envelope(r, 400, "messages")
    assert "3" in error["message"] and "2" in error["message"]
    assert fetcher.fetched == [] and engine.calls == []


# -- error statuses ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (chat(temperature="hot"), "temperature", "invalid_type"),
        (chat(temperature=5), "temperature", "decimal_above_max_value"),
        (chat(n=9), "n", "integer_above_max_value"),
        (chat(n=0), "n", "integer_below_min_value"),
        (chat(top_p=1.5), "top_p", "decimal_above_max_value"),
        (chat(max_completion_tokens=10**6), "max_completion_tokens", None),
        (chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
        (chat(max_tokens="8"), "max_tokens", "invalid_type"),
        (chat(stream="yes"), "stream", "invalid_type"),
        (chat(seed=2**63), "seed", "integer_above_max_value"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
        (chat(top_logprobs=3), "top_logprobs", "invalid_value"),
        (chat(stop=[1, 2]), "stop[0]", "invalid_type"),
        (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
        ({"model": MODEL}, "messages", "missing_required_parameter"),
        ({"model": MODEL, "messages": []}, "messages", "empty_array"),
        (
            {"model": MODEL, "messages": [{"role": "user"}]},
            "messages[0].content",
            "missing_required_parameter",
        ),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": PNG, "detail": "mid"}}],
                    }
                ],
            },
            "messages[0].content[0].image_url.detail",
            "invalid_value",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0]",
            None,
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": PNG}]}],
            },
            "messages[0].content[0].image_url",
            "invalid_type",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}
                ],
            },
            "messages[0].content[0]",
            None,
        ),
    ],
)
async def test_400_names_the_field(body: dict[str, Any], param: str, code: str | None) -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=body)
    error = assert_envelope(r, 400, param)
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    assert_conforms("ErrorResponse", r.json())


@pytest.mark.anyio
async def test_400_for_bad_json_and_non_object_body() -> None:
    async with client(make_app()) as c:
        bad = await c.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        array = await c.post("/v1/chat/completions", json=[1, 2])
        no_type = await c.post(
            "/v1/chat/completions",
            content=b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}]}',
        )
    assert assert_envelope(bad, 400)["code"] == "invalid_json"
    assert_envelope(array, 400)
    assert no_type.status_code == 200  # JSON without a Content-Type is still JSON


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "status", "param"),
    [
        (
            PromptTooLongError("prompt is 5000 tokens; max_model_len is 4096", param="messages"),
            400,
            "messages",
        ),
        (
            MediaTooLargeError("image has too many pixels", param="messages[0].content[0]"),
            413,
            "messages[0].content[0]",
        ),
        (EngineDeadError("dead"), 503, None),
    ],
)
async def test_engine_errors_map_to_statuses(error: Exception, status: int, param: str | None) -> None:
    async with client(make_app(FakeEngine(error=error))) as c:
        r = await c.post("/v1/chat/completions", json=chat())
    assert_envelope(r, status, param)


@pytest.mark.anyio
async def test_413_for_an_image_over_its_limit() -> None:
    body = chat()
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": PNG}}]
    async with client(make_app(max_image_bytes=8)) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert assert_envelope(r, 413, "messages[0].content[0].image_url.url")["code"] == "media_too_large"


@pytest.mark.anyio
async def test_queue_full_is_503_with_retry_after() -> None:
    async with client(make_app(FakeEngine(error=QueueFullError("queue full")))) as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=True))
    assert_envelope(r, 503)
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_500_has_no_internals(stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    async with client(make_app(FakeEngine(error=RuntimeError(SECRET_DETAIL)))) as c:
        r = await c.post(
            "/v1/chat/completions", json=chat(stream=stream), headers={"X-Request-Id": "trace-me-1"}
        )
    error = assert_envelope(r, 500)
    assert SECRET_DETAIL not in r.text and "RuntimeError" not in r.text
    assert "trace-me-1" in error["message"] and r.headers["x-request-id"] == "trace-me-1"
    # The traceback is logged, tagged with the request id the client can quote.
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and logged[0].request_id == "trace-me-1"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_404_405_in_envelope() -> None:
    async with client(make_app()) as c:
        unknown_model = await c.post("/v1/chat/completions", json=chat() | {"model": "gpt-4"})
        unknown_card = await c.get("/v1/models/gpt-4")
        unknown_route = await c.get("/v1/nope")
        wrong_method = await c.get("/v1/chat/completions")
    assert assert_envelope(unknown_model, 404, "model")["code"] == "model_not_found"
    assert_envelope(unknown_card, 404)
    assert_envelope(unknown_route, 404)
    assert_envelope(wrong_method, 405)


@pytest.mark.anyio
async def test_413_body_by_length_and_by_counting() -> None:
    big = b'{"messages": "' + b"x" * 5000 + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async with client(make_app(max_body_bytes=1000)) as c:
        declared = await c.post("/v1/chat/completions", content=big)
        streamed = await c.post("/v1/chat/completions", content=chunks())  # chunked: no Content-Length
    assert "content-length" not in streamed.request.headers
    assert assert_envelope(declared, 413)["code"] == "body_too_large"
    assert_envelope(streamed, 413)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
_json = st.recursive(
    _scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
    max_leaves=8,
)
_urls = st.sampled_from([PNG, MP4, "data:image/png;base64,@@", "ftp://x", "file:///etc/passwd", "", "data:"])
_media = st.fixed_dictionaries(
    {"url": _urls}, optional={"detail": st.sampled_from(["low", "high", "x"]), "max_dynamic_patch": _scalars}
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=10), _json)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(_urls, _media)}),
    st.fixed_dictionaries({"type": st.just("video_url"), "video_url": _media}),
    _json,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])},
    optional={"content": st.one_of(st.text(max_size=10), st.lists(_part, max_size=3), _json)},
)
_FIELDS = ["temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed", "logprobs",
           "top_logprobs", "stream", "stream_options", "top_k", "min_p", "model"]  # fmt: skip
_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, max_size=3), _json)}, optional=dict.fromkeys(_FIELDS, _json)
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_arbitrary_bodies_never_get_a_5xx(body: dict[str, Any]) -> None:
    """Whatever JSON arrives: a 4xx in the envelope, or a well-formed answer; never a 500."""

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=FUZZ_APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            # json.dumps writes NaN and Infinity, which Python's parser (and so FastAPI) accepts.
            payload = json.dumps(body).encode()
            return await c.post("/v1/chat/completions", content=payload, headers=JSON)

    r = asyncio.run(post())
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n")


FUZZ_APP = make_app()


# -- disconnects ---------------------------------------------------------------------------------


async def drive_until_disconnect(
    app: FastAPI, body: bytes, disconnect_after_chunks: int
) -> list[dict[str, Any]]:
    """Call the ASGI app directly; the client 'leaves' once it has seen some response chunks."""
    sent: list[dict[str, Any]] = []
    seen = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await seen.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if len(bodies) >= disconnect_after_chunks:
            seen.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    if disconnect_after_chunks == 0:
        seen.set()
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.anyio
async def test_disconnect_mid_stream_aborts_the_engine_request() -> None:
    engine = FakeEngine(token_delay_s=0.05)
    app = make_app(engine)
    words = " ".join(f"w{i}" for i in range(200))  # 10 s of tokens if nobody stops it
    body = httpx.Request("POST", "http://t", json=chat(words, stream=True)).read()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with app.router.lifespan_context(app):
        sent = await drive_until_disconnect(app, body, disconnect_after_chunks=3)
    assert loop.time() - started < 2
    assert len(engine.aborted) == 1 and engine.finished == []
    assert engine.aborted[0] == engine.calls[0][0]
    metrics = app.state.server.metrics.render().decode()
    assert 'internvl:request_errors_total{error_type="client_disconnected",' in metrics
    assert b"[DONE]" not in b"".join(m.get("body", b"") for m in sent)


@pytest.mark.anyio
async def test_disconnect_during_non_streaming_aborts_too() -> None:
    engine = FakeEngine(token_delay_s=0.05)
    app = make_app(engine)
    body = httpx.Request("POST", "http://t", json=chat(" ".join(["w"] * 200))).read()
    async with app.router.lifespan_context(app):
        await drive_until_disconnect(app, body, disconnect_after_chunks=0)
    assert len(engine.aborted) == 1 and engine.finished == []


# -- auth, CORS, health, metrics, models ---------------------------------------------------------


@pytest.mark.anyio
async def test_api_key_required_everywhere_but_health() -> None:
    anon: dict[str, str] = {}
    wrong = {"Authorization": "Bearer wrong"}
    ok = {"Authorization": "Bearer k2"}
    async with client(make_app(api_keys=["k1", "k2"])) as c:
        for headers in (anon, wrong, {"Authorization": "k2"}):
            for method, path in [
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/nope"),
            ]:
                r = await c.request(method, path, json=chat(), headers=headers)
                assert_envelope(r, 401)
                assert r.headers["www-authenticate"] == "Bearer"
            assert (await c.get("/health", headers=headers)).status_code == 200
            assert (await c.get("/metrics", headers=headers)).status_code == 200  # public by default
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        assert (await c.post("/v1/chat/completions", json=chat(), headers=ok)).status_code == 200


@pytest.mark.anyio
async def test_metrics_can_require_auth() -> None:
    async with client(make_app(api_keys=["k1"], metrics_require_auth=True)) as c:
        assert_envelope(await c.get("/metrics"), 401)
        assert (await c.get("/metrics", headers={"Authorization": "Bearer k1"})).status_code == 200


@pytest.mark.anyio
async def test_cors_off_by_default_and_on_when_configured() -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with client(make_app()) as c:
        off = await c.options("/v1/chat/completions", headers=preflight)
        off_get = await c.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in off.headers
    assert "access-control-allow-origin" not in off_get.headers
    app = make_app(cors_allow_origins=["https://ui.example"], api_keys=["k"])
    async with client(app) as c:
        on = await c.options("/v1/chat/completions", headers=preflight | {"Origin": "https://ui.example"})
    assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "https://ui.example"


@pytest.mark.anyio
async def test_health_follows_engine_and_draining() -> None:
    engine = FakeEngine(health_state="starting")
    app = make_app(engine)
    async with client(app) as c:
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/v1/chat/completions", json=chat())
        assert assert_envelope(r, 503)["code"] == "engine_unavailable" and "retry-after" in r.headers
        engine.health_state = "ready"
        assert (await c.get("/health")).json() == {"status": "ready"}
        begin_drain(app)
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/v1/chat/completions", json=chat())
        assert assert_envelope(r, 503)["code"] == "draining" and "retry-after" in r.headers
        engine.health_state = "dead"
        assert (await c.get("/health")).status_code == 503


@pytest.mark.anyio
async def test_metrics_endpoint() -> None:
    async with client(make_app()) as c:
        await c.post("/v1/chat/completions", json=chat())
        await c.post("/v1/chat/completions", json=chat(n=99))
        text = (await c.get("/metrics")).text
    label = f'model_name="{MODEL}"'
    for name in (
        "internvl:time_to_first_token_seconds_bucket",
        "internvl:inter_token_latency_seconds_bucket",
        "internvl:e2e_request_latency_seconds_count",
        "internvl:request_queue_time_seconds_count",
    ):
        assert f"{name}{{" in text and label in text
    assert f"internvl:num_requests_running{{{label}}} 2.0" in text
    assert f"internvl:num_requests_waiting{{{label}}} 1.0" in text
    assert f"internvl:kv_cache_usage_perc{{{label}}} 0.25" in text
    assert f"internvl:prompt_tokens_total{{{label}}} 2.0" in text
    assert f"internvl:generation_tokens_total{{{label}}} 3.0" in text
    assert 'internvl:request_success_total{finish_reason="stop",' in text
    assert 'internvl:request_errors_total{error_type="integer_above_max_value",' in text


@pytest.mark.anyio
async def test_models_endpoints() -> None:
    async with client(make_app()) as c:
        listing = (await c.get("/v1/models")).json()
        card = (await c.get("/v1/models/org/alias")).json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [MODEL, "org/alias"]
    assert card == listing["data"][1] and card["max_model_len"] == FAKE_INFO.max_model_len
    assert card["object"] == "model"


@pytest.mark.anyio
async def test_client_request_id_echoed_only_when_harmless() -> None:
    async with client(make_app()) as c:
        echoed = await c.get("/health", headers={"X-Request-Id": "abc-123"})
        replaced = await c.get("/health", headers={"X-Request-Id": "bad id\x7f" + "x" * 200})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])


@pytest.mark.anyio
async def test_watchdog_fires_once_the_engine_is_dead() -> None:
    engine = FakeEngine()
    fired = asyncio.Event()
    task = asyncio.create_task(watch_engine(engine, fired.set, poll_s=0.01, grace_s=0.01))
    await asyncio.sleep(0.05)
    assert not fired.is_set()
    engine.health_state = "dead"
    await asyncio.wait_for(fired.wait(), timeout=1)
    await task


# -- the process: SIGTERM drains, a dead engine ends it ------------------------------------------

SERVE_FAKE = """
import asyncio, json, sys
from server.cli import serve
from server.log import configure_logging
from server.settings import Settings
from tests.fakes import FakeEngine
configure_logging("info")
overrides = {"drain_timeout_s": 10, **json.loads(sys.argv[2])}
settings = Settings(port=int(sys.argv[1]), served_model_name=["fake-model"], **overrides)
sys.exit(asyncio.run(serve(settings, FakeEngine(token_delay_s=0.05, die_on_text="die"))))
"""


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`server.cli.serve` over a FakeEngine in a subprocess, on a free loopback port; settings
    overrides come from the test's `settings` mark."""
    mark = request.node.get_closest_marker("settings")
    overrides = json.dumps(mark.kwargs if mark else {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_FAKE, str(port), overrides], cwd=repo, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.05)
    try:
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def test_sigterm_drains_in_flight_streams_then_exits_0(served: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, base = served
    words = " ".join(f"w{i}" for i in range(30))  # about 1.5 s of streaming
    with (
        httpx.Client(base_url=base, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json=chat(words, stream=True)) as r,
    ):
        chunks = r.iter_bytes()
        received = next(chunks)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        # The server keeps listening while it drains: new requests get 503 and Retry-After.
        late = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=5)
        assert late.status_code == 503 and "retry-after" in late.headers
        assert late.json()["error"]["code"] == "draining"
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        received += b"".join(chunks)
    events = parse_sse(received.decode())
    assert events[-1] == "[DONE]"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == f"echo: {words}"  # the in-flight stream completed
    assert proc.wait(timeout=10) == 0


@pytest.mark.settings(drain_timeout_s=0.5)
def test_requests_past_the_drain_deadline_end_with_an_error(
    served: tuple[subprocess.Popen[bytes], str],
) -> None:
    """A stream still running at the deadline gets an error event and [DONE]; a non-streaming
    request a JSON 500; both name the shutdown."""
    proc, base = served
    words = " ".join(f"w{i}" for i in range(100))  # about 5 s of output

    async def run() -> tuple[bytes, httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=15) as c:

            async def stream() -> bytes:
                async with c.stream("POST", "/v1/chat/completions", json=chat(words, stream=True)) as r:
                    return b"".join([chunk async for chunk in r.aiter_bytes()])

            streamed = asyncio.create_task(stream())
            whole = asyncio.create_task(c.post("/v1/chat/completions", json=chat(words)))
            await asyncio.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
            return await streamed, await whole

    received, whole = asyncio.run(run())
    events = parse_sse(received.decode())
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "server_shutting_down"
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "server_shutting_down"
    assert proc.wait(timeout=10) == 0


@pytest.fixture
def connect() -> Iterator[Callable[[str], socket.socket]]:
    """Opens raw connections to a server; all closed after the test."""
    opened: list[socket.socket] = []

    def open_(base: str) -> socket.socket:
        host, port = base.removeprefix("http://").split(":")
        opened.append(socket.create_connection((host, int(port)), timeout=5))
        return opened[-1]

    yield open_
    for sock in opened:
        sock.close()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (reads end) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.settings(header_timeout_s=0.5)
def test_half_sent_headers_are_cut_at_the_header_deadline(
    served: tuple[subprocess.Popen[bytes], str], connect: Callable[[str], socket.socket]
) -> None:
    _, base = served
    silent, partial = connect(base), connect(base)
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    assert _closed_within(silent, 3) and _closed_within(partial, 3)
    # A complete request on time is served, and its kept-alive connection gets a new deadline.
    kept = connect(base)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /heal")
    assert _closed_within(kept, 3)


@pytest.mark.settings(body_timeout_s=0.5)
def test_a_body_sent_too_slowly_is_a_408(
    served: tuple[subprocess.Popen[bytes], str], connect: Callable[[str], socket.socket]
) -> None:
    _, base = served
    sock = connect(base)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"messages"'
    )
    sock.settimeout(5)
    answer = b""
    while b"body_timeout" not in answer and (chunk := sock.recv(4096)):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


@pytest.mark.settings(max_connections=4)
def test_at_the_connection_cap_idle_connections_make_room(
    served: tuple[subprocess.Popen[bytes], str], connect: Callable[[str], socket.socket]
) -> None:
    _, base = served
    idle = [connect(base) for _ in range(4)]
    time.sleep(0.2)
    fresh = connect(base)  # at the cap: the longest idle connection is closed for it
    assert _closed_within(idle[0], 2) and not _closed_within(idle[1], 0.2)
    fresh.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fresh.recv(4096).startswith(b"HTTP/1.1 200")


@pytest.mark.settings(max_connections=3)
def test_when_every_connection_is_busy_a_new_one_is_closed(
    served: tuple[subprocess.Popen[bytes], str], connect: Callable[[str], socket.socket]
) -> None:
    _, base = served
    words = " ".join(f"w{i}" for i in range(60))  # 3 s of streaming each
    body = json.dumps(chat(words, stream=True)).encode()
    busy = [connect(base) for _ in range(3)]
    for sock in busy:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert _closed_within(connect(base), 2)


def test_malformed_http_gets_the_json_envelope(
    served: tuple[subprocess.Popen[bytes], str], connect: Callable[[str], socket.socket]
) -> None:
    _, base = served
    sock = connect(base)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_http"


def test_dead_engine_fails_health_then_exits_nonzero(served: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, base = served
    r = httpx.post(f"{base}/v1/chat/completions", json=chat("die"), timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert httpx.get(f"{base}/health", timeout=5).status_code == 503
    assert proc.wait(timeout=10) == 1


# -- tenant isolation of caches --------------------------------------------------------------------


@pytest.mark.anyio
async def test_cache_salt_reaches_the_engine_and_is_validated() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
        assert (await c.post("/v1/chat/completions", json=chat(cache_salt="s1"))).status_code == 200
        assert_envelope(await c.post("/v1/chat/completions", json=chat(cache_salt="")), 400, "cache_salt")
    assert engine.cache_salts[0] == ""
    assert "s1" in engine.cache_salts[1]


@pytest.mark.anyio
async def test_caches_keyed_by_api_key_when_isolated() -> None:
    engine = FakeEngine()
    async with client(make_app(engine, api_keys=["k1", "k2"], cache_isolation="api_key")) as c:
        for key in ("k1", "k1", "k2"):
            r = await c.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
    first, again, other = engine.cache_salts
    assert first == again and first != other and first and other
    shared = FakeEngine()
    async with client(make_app(shared, api_keys=["k1", "k2"])) as c:
        for key in ("k1", "k2"):
            await c.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
    assert shared.cache_salts == ["", ""]  # the default: one cache for all


# -- a stalled loop, slow clients, log floods ----------------------------------------------------


@pytest.mark.anyio
async def test_health_reports_a_lagging_event_loop() -> None:
    app = make_app(max_event_loop_lag_s=0.3)
    async with client(app) as c:
        assert (await c.get("/health")).json() == {"status": "ready"}
        await asyncio.sleep(0.05)  # the monitor's first sample is under way
        time.sleep(0.6)  # noqa: ASYNC251 - the point: something holds the event loop
        await asyncio.sleep(0.4)  # the monitor's next wake-up measures it
        r = await c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "lagging"}
        metrics = (await c.get("/metrics")).text
    lag = next(line for line in metrics.splitlines() if line.startswith("internvl:event_loop_lag_seconds{"))
    assert float(lag.rsplit(" ", 1)[1]) >= 0.3


def test_the_lag_window_forgets_old_stalls() -> None:
    from server.loop_monitor import LoopLagMonitor

    monitor = LoopLagMonitor(1.0, window_s=10)
    monitor.record(3.0, now=100.0)
    assert monitor.lagging and monitor.lag_s == 3.0
    monitor.record(0.01, now=111.0)
    assert not monitor.lagging


@pytest.mark.anyio
async def test_a_client_that_stops_reading_is_cut_after_the_send_timeout() -> None:
    from server.chat import EngineStreamResponse

    closed, timed_out = asyncio.Event(), []

    async def events() -> AsyncIterator[str]:
        for i in range(10):
            yield f"data: {i}\n\n"

    async def on_close() -> None:
        closed.set()

    response = EngineStreamResponse(
        events(), on_close, send_timeout_s=0.2, on_send_timeout=lambda: timed_out.append(1)
    )
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            await asyncio.sleep(3600)  # the socket's buffers are full: the client reads nothing

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/", "headers": []}
    await asyncio.wait_for(response(scope, receive, send), 5)
    assert closed.is_set() and timed_out == [1]
    assert sum(1 for m in sent if m.get("body")) == 1  # nothing after the blocked send


def test_log_floods_are_rate_limited() -> None:
    from server.log import RateLimitFilter

    now = [0.0]
    limiter = RateLimitFilter(rate=10, burst=5, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [limiter.filter(record("Invalid HTTP request received.")) for _ in range(100)]
    assert sum(passed) == 5
    assert limiter.filter(record("another message"))  # each kind has its own budget
    now[0] = 1.0
    later = record("Invalid HTTP request received.")
    assert limiter.filter(later) and "95 similar messages suppressed" in later.getMessage()


# -- tools, structured output, grounding ---------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.anyio
async def test_tool_calls_are_parsed_into_the_message() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=chat(CALL_TEXT, tools=[WEATHER_TOOL]))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"]) and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"]["content"] == "echo:"


@pytest.mark.anyio
async def test_tool_calls_stream_as_openai_does() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=chat(CALL_TEXT, tools=[WEATHER_TOOL], stream=True))
    events = parse_sse(r.text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    head, args = pieces
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    content = "".join(d.get("content", "") for d in deltas)
    assert content.strip() == "echo:" and "<tool_call" not in content
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
async def test_without_tools_or_with_tool_choice_none_the_text_is_left_alone() -> None:
    async with client(make_app()) as c:
        plain = await c.post("/v1/chat/completions", json=chat(CALL_TEXT))
        none = await c.post(
            "/v1/chat/completions", json=chat(CALL_TEXT, tools=[WEATHER_TOOL], tool_choice="none")
        )
    for r in (plain, none):
        message = r.json()["choices"][0]["message"]
        assert "tool_calls" not in message and "<tool_call>" in message["content"]


@pytest.mark.anyio
async def test_tool_history_reaches_the_engine() -> None:
    engine = FakeEngine()
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    body = {"model": MODEL, "messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    async with client(make_app(engine)) as c:
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
    chat_input = engine.calls[0][1]
    assert chat_input.tool_choice == "required" and chat_input.tools[0].name == "get_weather"
    assistant, tool = chat_input.messages[1], chat_input.messages[2]
    assert assistant.tool_calls[0].arguments == '{"city": "Oslo"}'
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.parts == ("-3 C",)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": []},
                    {"role": "user", "content": "y", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
                ]
            },
            "messages[1].tool_calls",
        ),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, None),
        ({"response_format": {"type": "xml"}}, None),
    ],
)
async def test_bad_tools_and_formats_are_400s(fields: dict[str, Any], param: str | None) -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json={**chat(), **fields})
    error = assert_envelope(r, 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.anyio
async def test_response_format_and_logit_bias_reach_the_engine() -> None:
    engine = FakeEngine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    async with client(make_app(engine)) as c:
        await c.post("/v1/chat/completions", json=chat(response_format=fmt, logit_bias={"7": -100, "9": 2.5}))
        await c.post("/v1/chat/completions", json=chat(response_format={"type": "json_object"}))
        await c.post("/v1/chat/completions", json=chat(response_format={"type": "text"}))
    first, second, third = (call[1].output_format for call in engine.calls)
    assert first.kind == "json_schema" and first.schema == schema and first.strict
    assert second.kind == "json_object" and third is None
    assert engine.calls[0][2].logit_bias == ((7, -100.0), (9, 2.5))


def _png_data_url(width: int, height: int) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.anyio
async def test_grounded_answers_carry_their_boxes() -> None:
    box_text = "<ref>the cat</ref><box>[[100, 200, 500, 1000]]</box>"
    content = [
        {"type": "image_url", "image_url": {"url": _png_data_url(640, 480)}},
        {"type": "text", "text": box_text},
    ]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    expected = [
        {"label": "the cat", "image_index": 0, "box": [100, 200, 500, 1000], "box_pixels": [64, 96, 320, 480]}
    ]
    async with client(make_app()) as c:
        whole = await c.post("/v1/chat/completions", json=body)
        streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
        plain = await c.post("/v1/chat/completions", json=chat("no boxes here"))
    message = whole.json()["choices"][0]["message"]
    assert message["grounding"] == expected and "<box>" in message["content"]  # the text is kept
    last = [e for e in parse_sse(streamed.text)[:-1] if e["choices"] and e["choices"][0]["finish_reason"]][-1]
    assert last["choices"][0]["delta"]["grounding"] == expected
    assert "grounding" not in plain.json()["choices"][0]["message"]
