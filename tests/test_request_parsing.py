"""Bodies are checked cheapest first: counts and unencodable text before any model is built, large
bodies off the event loop, and whatever a client sends, a 4xx rather than a 500."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.errors import BadRequestError
from server.protocol import ChatCompletionRequest
from server.request_parsing import LARGE_BODY_BYTES, BodyLimits, parse_body, parse_request
from tests.test_api import MODEL, assert_envelope, chat, client, make_app

LIMITS = BodyLimits(max_messages=4, max_content_parts=6, max_stop_token_ids=2)


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * 5}, "messages", "too_many_messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 4}] * 2},
            "messages",
            "too_many_content_parts",
        ),
        ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids", "too_many_stop_token_ids"),
    ],
)
def test_counts_are_refused_before_validation(fields, param, code) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_body(body(**fields), ChatCompletionRequest, LIMITS)
    assert (caught.value.param, caught.value.code) == (param, code)


SMALL_TEXT = BodyLimits(max_messages=2048, max_content_parts=4096, max_stop_token_ids=8, max_text_bytes=1000)
CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 600}}
FAT_TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "d" * 600, "parameters": {"p": "q" * 600}},
}


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"messages": [{"role": "assistant", "tool_calls": [CALL, CALL]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [FAT_TOOL]}, "tools"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "x" * 1200}]},
            "input",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x" * 1200}]}, "input"),
        ({"input": "hi", "tools": [{"type": "function", "name": "f", "description": "d" * 1200}]}, "tools"),
    ],
)
def test_tool_text_counts_against_the_text_limit_on_the_raw_json(data, param) -> None:
    """16 x 1 MB of tool-call arguments or tool descriptions were tokenized for 20 s before their 400."""
    from server.protocol.responses import ResponseRequest

    model = ResponseRequest if "input" in data else ChatCompletionRequest
    with pytest.raises(BadRequestError) as caught:
        parse_body(json.dumps({"model": "m", **data}).encode(), model, SMALL_TEXT)
    assert (caught.value.param, caught.value.code) == (param, "text_too_long")


def test_responses_items_are_counted_as_input() -> None:
    from server.protocol.responses import ResponseRequest

    raw = json.dumps({"model": "m", "input": [{"role": "user", "content": "x"}] * 5}).encode()
    with pytest.raises(BadRequestError) as caught:
        parse_body(raw, ResponseRequest, LIMITS)
    assert (caught.value.param, caught.value.code) == ("input", "too_many_messages")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(constant: bytes) -> None:
    """A NaN temperature passed every range check (comparisons with NaN are false) and ran 2 minutes."""
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": ' + constant + b"}"
    with pytest.raises(BadRequestError) as caught:
        parse_body(raw, ChatCompletionRequest, LIMITS)
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (b'{"model": "\\udfff", "messages": [{"role": "user", "content": "a"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "user": "\\ud83d"}', "user"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(raw: bytes, param: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_body(raw, ChatCompletionRequest, LIMITS)
    assert caught.value.param == param and "surrogate" in caught.value.message


def test_a_surrogate_pair_is_an_emoji_not_an_error() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert parse_body(raw, ChatCompletionRequest, LIMITS).messages[0].content[0].text == "\U0001f600"


@pytest.mark.anyio
async def test_a_large_body_is_parsed_off_the_event_loop() -> None:
    big = body(messages=[{"role": "user", "content": "x" * 1000}] * 3)
    padded = big[:-1] + b', "padding": "' + b"p" * LARGE_BODY_BYTES + b'"}'
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    parsed = await parse_request(padded, ChatCompletionRequest, LIMITS)
    task.cancel()
    assert len(parsed.messages) == 3 and ticks > 0  # the loop ran while the body was parsed


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_sixteen_megabytes_of_empty_messages_are_refused_fast() -> None:
    """A body that used to stall the event loop for seconds in validation is counted first."""
    messages = [{"role": "user", "content": ""}] * 1_000_000
    payload = json.dumps({"model": MODEL, "messages": messages})
    async with client(make_app(max_body_bytes=64 * 2**20)) as c:
        started = time.monotonic()
        r = await c.post(
            "/v1/chat/completions", content=payload, headers={"content-type": "application/json"}
        )
        elapsed = time.monotonic() - started
    assert_envelope(r, 400, "messages")
    assert r.json()["error"]["code"] == "too_many_messages"
    assert elapsed < 5, elapsed


@pytest.mark.anyio
async def test_unencodable_model_names_never_become_a_500() -> None:
    async with client(make_app()) as c:
        r = await c.post(
            "/v1/chat/completions",
            content=b'{"model": "\\udc80", "messages": [{"role": "user", "content": "x"}]}',
            headers={"content-type": "application/json"},
        )
        assert_envelope(r, 400, "model")
        r = await c.get("/v1/models/%ED%A0%80")  # the UTF-8 bytes of a surrogate
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.anyio
async def test_head_works_where_get_does() -> None:
    async with client(make_app()) as c:
        for path in ("/health", "/v1/models", f"/v1/models/{MODEL}", "/metrics"):
            get, head = await c.get(path), await c.head(path)
            assert head.status_code == get.status_code == 200 and head.content == b"", path


@pytest.mark.anyio
async def test_the_request_body_is_still_documented_in_openapi() -> None:
    async with client(make_app()) as c:
        schema = (await c.get("/openapi.json")).json()
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]
    async with client(make_app()) as c:
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages", "text_too_long"),
        (
            {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(5)]},
            "tools",
            "too_many_tools",
        ),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "too_many_logit_bias"),
        ({"stop": ["a"] * 5}, "stop", "array_above_max_length"),
        ({"stop": "x" * 1025}, "stop", "invalid_value"),
    ],
)
def test_lengths_are_refused_on_the_raw_json(fields: dict, param: str, code: str) -> None:
    limits = BodyLimits(
        max_messages=10, max_content_parts=10, max_stop_token_ids=4, max_text_bytes=4096, max_tools=4
    )
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()
    with pytest.raises(BadRequestError) as info:
        parse_body(body, ChatCompletionRequest, limits)
    assert info.value.param == param and info.value.code == code


def test_a_number_with_too_many_digits_is_a_400_not_a_500() -> None:
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"
    with pytest.raises(BadRequestError, match="too many digits"):
        parse_body(body, ChatCompletionRequest, BodyLimits(10, 10, 4))


def test_large_bodies_are_parsed_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads holds the GIL for a whole body: parsed side by side, eight 16 MB bodies kept the
    event loop (and /health) waiting over a second."""
    import server.request_parsing as parsing

    running, peak = 0, 0

    def slow_parse(body: bytes, model: type, limits: BodyLimits) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        time.sleep(0.02)
        running -= 1
        return "parsed"

    monkeypatch.setattr(parsing, "parse_body", slow_parse)
    big = b" " * (LARGE_BODY_BYTES + 1)

    async def flood() -> list[str]:
        return await asyncio.gather(*(parse_request(big, ChatCompletionRequest, LIMITS) for _ in range(6)))

    assert asyncio.run(flood()) == ["parsed"] * 6
    assert peak == 1
