"""Structured output and tools end to end, through the client libraries people use.

The server runs a tiny random model, so only constrained decoding can make these pass: every
answer below is schema-valid JSON or a valid tool call because the grammar allowed nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.openapi_spec import SpecCheckingTransport, checked_openai
from tests.server_process import (
    MAIN,
    SERVED_MODEL_NAME,
    ServerProcess,
    SharedServers,
    data_uri,
    image_bytes,
    session_servers,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 400


class Person(pydantic.BaseModel):
    # Every field bounded: a random model sampling an unbounded integer can write digits until
    # max_tokens (instructor's default mode does not send a temperature).
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=150)
    city: str = pydantic.Field(max_length=16)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["a", "b"],
        },
    },
}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> ServerProcess:
    shared: SharedServers = session_servers(request)
    return shared.pool.get(MAIN)


@pytest.fixture(scope="module")
def base_url(server: ServerProcess) -> str:
    return f"{server.base_url}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with checked_openai(base_url) as c:
        yield c


def test_openai_parse_with_an_image(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": data_uri("image/png", image_bytes(320, 240))}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "Who is this?"}]}]
    r = client.chat.completions.parse(
        model=SERVED_MODEL_NAME, messages=messages, response_format=Person, max_tokens=MAX_TOKENS, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)


def test_json_schema_streamed_with_two_choices(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    stream = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": "Two people, please."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        n=2,
        stream=True,
        max_tokens=MAX_TOKENS,
        seed=7,
    )
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls(client: openai.OpenAI, stream: bool, tool_choice: Any) -> None:
    fields: dict[str, Any] = {
        "model": SERVED_MODEL_NAME,
        "messages": [{"role": "user", "content": "What is 2 + 3, and the weather in Oslo?"}],
        "tools": [WEATHER, ADD],
        "tool_choice": tool_choice,
        "max_tokens": MAX_TOKENS,
        "seed": 3,
    }
    if stream:
        calls: dict[int, dict[str, str]] = {}
        reason = None
        for chunk in client.chat.completions.create(stream=True, **fields):
            for choice in chunk.choices:
                reason = choice.finish_reason or reason
                for piece in choice.delta.tool_calls or []:
                    call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += piece.id or ""
                    call["name"] += (piece.function.name or "") if piece.function else ""
                    call["arguments"] += (piece.function.arguments or "") if piece.function else ""
        made = list(calls.values())
    else:
        r = client.chat.completions.create(**fields)
        reason = r.choices[0].finish_reason
        made = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in r.choices[0].message.tool_calls or []
        ]
    assert reason == "tool_calls" and made
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for call in made:
        assert call["id"].startswith("call_")
        if isinstance(tool_choice, dict):
            assert call["name"] == "add"
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_an_agent_loop_with_a_tool_turn(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Add 2 and 3."}]
    first = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=messages,
        tools=[ADD],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        seed=2,
    )
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    messages += [
        {"role": "tool", "tool_call_id": call.id, "content": "5"} for call in message.tool_calls or []
    ]
    second = client.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, tools=[ADD], max_tokens=16, seed=2
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_instructor_default_mode(base_url: str) -> None:
    import instructor

    with openai.OpenAI(base_url=base_url, api_key="unused") as raw:
        person = instructor.from_openai(raw).chat.completions.create(
            model=SERVED_MODEL_NAME,
            response_model=Person,
            messages=[{"role": "user", "content": "Jason, 25, Paris"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            max_retries=0,
        )
    assert isinstance(person, Person)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(base_url: str, method: str) -> None:
    from langchain_openai import ChatOpenAI

    with httpx.Client(
        transport=SpecCheckingTransport()
    ) as http:  # closed here, so no connection outlives the test
        llm = ChatOpenAI(
            model=SERVED_MODEL_NAME,
            base_url=base_url,
            api_key="unused",
            max_tokens=MAX_TOKENS,
            http_client=http,
        )
        assert isinstance(
            llm.with_structured_output(Person, method=method).invoke("Jason, 25, Paris"), Person
        )


def test_pydantic_ai_agent_output_type(base_url: str) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused") as raw:
            model = OpenAIChatModel(SERVED_MODEL_NAME, provider=OpenAIProvider(openai_client=raw))
            agent = Agent(model, output_type=Person, retries=0)
            # Greedy: a sampled random model's path through the grammar depends on what ran before.
            settings = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
            return await agent.run("Jason, 25, Paris", model_settings=settings)

    assert isinstance(asyncio.run(run()).output, Person)


def test_llm_cli_schema(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: served\n  model_name: {SERVED_MODEL_NAME}\n"
        f"  api_base: {base_url}\n  supports_schema: true\n"
    )
    llm = Path(sys.executable).parent / "llm"
    done = subprocess.run(
        [
            str(llm),
            "-m",
            "served",
            "--key",
            "unused",
            "--schema",  # bounded: a random model can write an unbounded string until max_tokens
            json.dumps(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 16},
                        "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    },
                    "required": ["name", "age"],
                }
            ),
            "-o",
            "max_tokens",
            str(MAX_TOKENS),
            "Jason is 25",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLM_USER_PATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)


def test_bad_schemas_and_tools_are_clear_400s(client: openai.OpenAI) -> None:
    base = {"model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    bad_format = {
        "type": "json_schema",
        "json_schema": {"name": "x", "strict": True, "schema": {"type": "string", "format": "bogus"}},
    }
    with pytest.raises(openai.BadRequestError, match="bogus"):
        client.chat.completions.create(response_format=bad_format, **base)
    unsupported = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "strict": True,
            "schema": {"type": "object", "dependentSchemas": {"a": {}}},
        },
    }
    with pytest.raises(openai.BadRequestError, match="dependentSchemas"):
        client.chat.completions.create(response_format=unsupported, **base)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            tools=[ADD], tool_choice={"type": "function", "function": {"name": "sub"}}, **base
        )


def test_arguments_that_do_not_fit_max_tokens_end_with_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": "weather"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=4,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    # ... and the server is unharmed
    again = client.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert again.choices[0].finish_reason in ("stop", "length")
