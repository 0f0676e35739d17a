"""The Responses API against a FakeEngine: translation into chat, output items, the event sequence,
the store; every answer and event is checked against OpenAI's spec by the client."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from model_runtime.request import ImageInput
from tests.app_client import MODEL, client, make_app
from tests.fakes import FakeEngine

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes").decode()
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def body(input: Any = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": input, **fields}


def sse_events(text: str) -> list[dict[str, Any]]:
    import json

    events = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        payload = json.loads(lines[1][len("data: ") :])
        assert payload["type"] == lines[0][len("event: ") :]
        events.append(payload)
    return events


@pytest.mark.anyio
async def test_text_input_gives_one_message_and_usage() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        r = await c.post("/v1/responses", json=body(instructions="be brief", max_output_tokens=50))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "response" and answer["id"].startswith("resp_")
    assert answer["status"] == "completed" and answer["instructions"] == "be brief"
    (message,) = answer["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["text"] == "echo: hello there"
    assert answer["usage"]["input_tokens"] == 4 and answer["usage"]["output_tokens"] == 3
    _, chat, params = engine.calls[0]
    assert [(m.role, m.parts) for m in chat.messages] == [
        ("system", ("be brief",)),
        ("user", ("hello there",)),
    ]
    assert params.max_tokens == 50


@pytest.mark.anyio
async def test_items_images_and_function_history_become_chat() -> None:
    engine = FakeEngine()
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": PNG, "detail": "low"},
            ],
        },  # noqa: E501
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "message", "role": "user", "content": "and now?"},
    ]
    async with client(make_app(engine)) as c:
        r = await c.post("/v1/responses", json=body(items, tools=[TOOL]))
    assert r.status_code == 200, r.text
    _, chat, _ = engine.calls[0]
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "user"]
    assert isinstance(chat.messages[0].parts[1], ImageInput) and chat.messages[0].parts[1].max_tiles == 1
    assert chat.messages[1].tool_calls[0].name == "get_weather"
    assert chat.messages[2].tool_call_id == "call_1" and chat.messages[2].parts == ("sunny",)
    assert [t.name for t in chat.tools] == ["get_weather"]


@pytest.mark.anyio
async def test_function_calls_become_output_items() -> None:
    engine = FakeEngine()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    async with client(make_app(engine)) as c:
        r = await c.post("/v1/responses", json=body(call, tools=[TOOL], tool_choice="auto"))
        s = await c.post("/v1/responses", json=body(call, tools=[TOOL], stream=True))
    output = r.json()["output"]
    calls = [item for item in output if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert calls[0]["call_id"].startswith("call_") and calls[0]["arguments"] == '{"city": "Oslo"}'
    events = sse_events(s.text)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"][0]
    assert done["name"] == "get_weather" and done["arguments"] == '{"city": "Oslo"}'


@pytest.mark.anyio
async def test_stream_follows_openais_event_sequence() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/responses", json=body("a b c", stream=True))
    events = sse_events(r.text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "echo: a b c" == events[-1]["response"]["output"][0]["content"][0]["text"]


@pytest.mark.anyio
async def test_length_is_incomplete_and_failures_are_response_failed() -> None:
    async with client(make_app(FakeEngine(fail_after=1))) as c:
        failed = sse_events((await c.post("/v1/responses", json=body("a b c", stream=True))).text)
    async with client(make_app()) as c:
        cut = (await c.post("/v1/responses", json=body("a b c d", max_output_tokens=2))).json()
        cut_stream = sse_events(
            (await c.post("/v1/responses", json=body("a b c", max_output_tokens=2, stream=True))).text
        )  # noqa: E501
    assert (
        failed[-1]["type"] == "response.failed" and failed[-1]["response"]["error"]["code"] == "server_error"
    )
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut_stream[-1]["type"] == "response.incomplete"


@pytest.mark.anyio
async def test_store_previous_response_get_and_delete() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        first = (await c.post("/v1/responses", json=body("first turn"))).json()
        second = await c.post("/v1/responses", json=body("second turn", previous_response_id=first["id"]))
        got = await c.get(f"/v1/responses/{first['id']}")
        deleted = await c.delete(f"/v1/responses/{first['id']}")
        gone = await c.get(f"/v1/responses/{first['id']}")
        missing = await c.post("/v1/responses", json=body("x", previous_response_id=first["id"]))
        unstored = (await c.post("/v1/responses", json=body("y", store=False))).json()
        not_kept = await c.get(f"/v1/responses/{unstored['id']}")
    assert second.status_code == 200 and got.json() == first
    assert deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert gone.status_code == 404 and not_kept.status_code == 404
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "previous_response_id"
    _, chat, _ = engine.calls[1]
    assert [(m.role, m.parts) for m in chat.messages] == [
        ("user", ("first turn",)),
        ("assistant", ("echo: first turn",)),
        ("user", ("second turn",)),
    ]


def test_store_bounds_count_and_bytes() -> None:
    from server.protocol.responses import ResponseObject
    from server.responses import ResponseStore

    store = ResponseStore(max_items=2, max_bytes=10_000, ttl_s=60)
    for i in range(3):
        store.put(ResponseObject(id=f"r{i}", created_at=0, status="completed", model="m"), [])
    with pytest.raises(Exception, match="No response"):
        store.get("r0")
    assert store.get("r2").response.id == "r2"
    store.put(ResponseObject(id="big", created_at=0, status="completed", model="m"), [{"x": "y" * 20_000}])
    with pytest.raises(Exception, match="No response"):
        store.get("big")
    expiring = ResponseStore(max_items=2, max_bytes=10_000, ttl_s=1e-9)
    expiring.put(ResponseObject(id="old", created_at=0, status="completed", model="m"), [])
    with pytest.raises(Exception, match="No response"):
        expiring.get("old")


@pytest.mark.anyio
async def test_text_format_and_logprobs_reach_the_engine() -> None:
    engine = FakeEngine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    async with client(make_app(engine)) as c:
        r = await c.post(
            "/v1/responses", json=body(text=fmt, include=["message.output_text.logprobs"], top_logprobs=2)
        )
    answer = r.json()
    assert answer["text"]["format"]["name"] == "thing"
    logprobs = answer["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == 3 and len(logprobs[0]["top_logprobs"]) == 2
    _, chat, params = engine.calls[0]
    assert chat.output_format is not None and chat.output_format.schema == schema
    assert params.logprobs and params.top_logprobs == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"background": True}, "background", "unsupported_parameter"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
        ({"include": ["file_search_call.results"]}, "include[0]", "unsupported_parameter"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "input", "invalid_value"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, None, None),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, None, None),
        ({"max_output_tokens": "9"}, "max_output_tokens", "invalid_type"),
        ({"temperature": 3}, "temperature", "decimal_above_max_value"),
        ({"truncation": "auto"}, "truncation", None),
        ({"previous_response_id": "resp_nope"}, "previous_response_id", "response_not_found"),
    ],
)
async def test_refusals_name_the_field(fields: dict[str, Any], param: str | None, code: str | None) -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/responses", json={**body(), **fields})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
