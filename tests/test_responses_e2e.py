"""The Responses API end to end: the official `openai` client's responses.create (text and image,
streamed and not, a function tool) and one agent turn through the `openai-agents` SDK, against the
real server and the random demo model; every answer and event checked against OpenAI's spec."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Annotated

import openai
import pydantic
import pytest

from tests.openapi_spec import checked_openai
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

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> ServerProcess:
    shared: SharedServers = session_servers(request)
    return shared.pool.get(MAIN)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with checked_openai(f"{server.base_url}/v1") as c:
        yield c


def test_responses_create_text_and_image(client: openai.OpenAI) -> None:
    image = data_uri("image/png", image_bytes(320, 240))
    r = client.responses.create(
        model=SERVED_MODEL_NAME,
        instructions="Answer briefly.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in the picture?"},
                    {"type": "input_image", "image_url": image, "detail": "low"},
                ],
            }
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert r.status in ("completed", "incomplete") and r.model == SERVED_MODEL_NAME
    assert r.output[0].type == "message" and r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 256 and r.usage.output_tokens <= 8  # a 256-token tile at least
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    follow = client.responses.create(
        model=SERVED_MODEL_NAME, input="And the colours?", previous_response_id=r.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > r.usage.input_tokens  # the first turn is part of the second
    assert follow.usage.input_tokens_details.cached_tokens > 0  # ... and its prefix was cached


def test_responses_stream_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model=SERVED_MODEL_NAME, input="Hello", max_output_tokens=6) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # Cut at max_output_tokens, a response ends with response.incomplete (the SDK's
    # get_final_response() wants response.completed, so the last event is read instead).
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.usage.output_tokens <= 6


def test_responses_function_tool_forced(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=SERVED_MODEL_NAME,
        input="What is the weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=120,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" and c.call_id.startswith("call_") for c in calls)
    result = client.responses.create(
        model=SERVED_MODEL_NAME,
        previous_response_id=r.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],
        max_output_tokens=8,
    )
    assert result.status in ("completed", "incomplete")


def test_openai_agents_turn_with_a_tool(server: ServerProcess) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: Annotated[str, pydantic.Field(max_length=12)]) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    async def run() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0
        ) as raw:
            agent = Agent(
                name="weather",
                instructions="Use the tool to answer.",
                tools=[get_weather],
                model=OpenAIResponsesModel(model=SERVED_MODEL_NAME, openai_client=raw),
                model_settings=ModelSettings(
                    tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=0
                ),
                # The tool's answer is the agent's: a random model's free text after it would only
                # run to max_tokens (response.incomplete, which the SDK treats as an error).
                tool_use_behavior="stop_on_first_tool",
            )
            result = await Runner.run(agent, "What is the weather in Oslo?", max_turns=3)
            return str(result.final_output)

    final = asyncio.run(run())
    assert seen and final == f"sunny in {seen[0]}"  # the model's call ran the tool
