"""POST /v1/completions, /tokenize, /detokenize, /version and Model.root against a FakeEngine; every
answer is checked against OpenAI's spec by the client (tests/app_client.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server.chat import SEND_SLICE_BYTES, dump_in_pieces, json_response
from server.protocol.chat import Usage
from server.protocol.completions import Completion, CompletionChoice, CompletionLogprobs
from server.protocol.responses import OutputMessage, OutputTextContent, ResponseObject
from tests.app_client import MODEL, client, make_app
from tests.fakes import FakeEngine, parse_sse


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def body(prompt: Any = "say hello", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, **fields}


@pytest.mark.anyio
async def test_completion_uses_the_prompt_verbatim() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        r = await c.post("/v1/completions", json=body("say hello"))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert answer["choices"] == [
        {"index": 0, "text": "echo: say hello", "logprobs": None, "finish_reason": "stop"}
    ]
    assert answer["usage"]["prompt_tokens"] == 2 and answer["usage"]["completion_tokens"] == 3
    (_, chat, params) = engine.calls[0]
    assert chat.prompt == "say hello" and chat.messages == ()
    assert params.max_tokens == 16  # OpenAI's default for completions


@pytest.mark.anyio
async def test_prompts_lists_and_token_ids_number_choices_prompt_by_prompt() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        texts = (await c.post("/v1/completions", json=body(["a b", "c"], n=2))).json()
        ids = (await c.post("/v1/completions", json=body([5, 6, 7]))).json()
        id_lists = (await c.post("/v1/completions", json=body([[5], [6, 7]]))).json()
    assert [(ch["index"], ch["text"]) for ch in texts["choices"]] == [
        (0, "echo0: a b"),
        (1, "echo1: a b"),
        (2, "echo0: c"),
        (3, "echo1: c"),
    ]
    assert texts["usage"]["prompt_tokens"] == 3 and texts["usage"]["completion_tokens"] == 3 * 2 + 2 * 2
    assert ids["choices"][0]["text"] == "echo: t5 t6 t7" and ids["usage"]["prompt_tokens"] == 3
    assert [ch["text"] for ch in id_lists["choices"]] == ["echo: t5", "echo: t6 t7"]
    prompts = [chat.prompt for _, chat, _ in engine.calls]
    assert prompts == ["a b", "c", (5, 6, 7), (5,), (6, 7)]


@pytest.mark.anyio
async def test_echo_prepends_the_prompt() -> None:
    async with client(make_app()) as c:
        text = (await c.post("/v1/completions", json=body("hi there", echo=True))).json()
        ids = (await c.post("/v1/completions", json=body([3, 4], echo=True))).json()
    assert text["choices"][0]["text"] == "hi thereecho: hi there"
    assert ids["choices"][0]["text"] == "t3 t4echo: t3 t4"  # the ids, detokenized


@pytest.mark.anyio
async def test_logprobs_in_the_legacy_layout() -> None:
    async with client(make_app()) as c:
        answer = (await c.post("/v1/completions", json=body("a b", logprobs=2))).json()
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["echo:", " a", " b"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5, -0.5]
    assert logprobs["text_offset"] == [0, 5, 7]
    assert logprobs["top_logprobs"] == [{"alt0": -1.0, "alt1": -2.0}] * 3


@pytest.mark.anyio
async def test_echo_with_logprobs_scores_the_prompt() -> None:
    """What lm-eval's local-completions sends for log-likelihoods: echo, logprobs, max_tokens 1."""
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        answer = (
            await c.post("/v1/completions", json=body("the cat sat", echo=True, logprobs=1, max_tokens=1))
        ).json()
        stream = await c.post(
            "/v1/completions", json=body("the cat", echo=True, logprobs=1, max_tokens=1, stream=True)
        )
    (_, _, params) = engine.calls[0]
    assert params.prompt_logprobs == 1 and params.logprobs and params.top_logprobs == 1
    choice = answer["choices"][0]
    assert choice["text"] == "the cat satecho:"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["the", "cat", "sat", "echo:"]
    assert logprobs["token_logprobs"] == [None, -0.25, -0.25, -0.5]
    assert logprobs["top_logprobs"] == [None, {"p0": -1.0}, {"p0": -1.0}, {"alt0": -1.0}]
    assert logprobs["text_offset"] == [0, 3, 6, 11]  # the fake's tokens drop the spaces; the text has them
    first = parse_sse(stream.text)[0]["choices"][0]
    assert first["text"] == "the cat" and first["logprobs"]["token_logprobs"] == [None, -0.25]


@pytest.mark.anyio
async def test_streaming_with_usage() -> None:
    async with client(make_app()) as c:
        r = await c.post(
            "/v1/completions",
            json=body(["x", "y z"], stream=True, stream_options={"include_usage": True}, echo=True),
        )
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks[:-1]:
        assert "usage" not in chunk
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "xecho: x", 1: "y zecho: y z"}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 3


@pytest.mark.anyio
async def test_a_failure_mid_stream_is_an_error_event() -> None:
    async with client(make_app(FakeEngine(fail_after=1))) as c:
        r = await c.post("/v1/completions", json=body("a b c", stream=True))
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and "error" in events[-2]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"suffix": "end"}, "suffix", "unsupported_parameter"),
        ({"best_of": 3}, "best_of", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"prompt": []}, "prompt", "empty_array"),
        ({"prompt": ["a"] * 33}, "prompt", "too_many_prompts"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"max_tokens": "8"}, "max_tokens", "invalid_type"),
        ({"logprobs": 6}, "logprobs", "integer_above_max_value"),
        ({"model": "nope"}, "model", "model_not_found"),
        ({"prompt": ["a"] * 9, "n": 8}, "prompt", "too_many_choices"),
        ({"prompt": [1] * 4097}, "prompt", "context_length_exceeded"),  # refused on the raw JSON
        ({"prompt": [[1], [2] * 4097]}, "prompt", "context_length_exceeded"),
    ],
)
async def test_refusals_name_the_field(fields: dict[str, Any], param: str, code: str) -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json={**body(), **fields})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error


@pytest.mark.anyio
async def test_missing_prompt_is_a_missing_parameter() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json={"model": MODEL})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "missing_required_parameter"


@pytest.mark.anyio
async def test_tokenize_detokenize_version_and_model_root() -> None:
    async with client(make_app(model="/models/InternVL3-8B")) as c:
        prompt = (await c.post("/tokenize", json={"prompt": "ab cde"})).json()
        messages = [{"role": "user", "content": "x yz"}]
        chat = (await c.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
        both = await c.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "x"}]})
        text = (await c.post("/detokenize", json={"tokens": [1, 2]})).json()
        version = (await c.get("/version")).json()
        card = (await c.get(f"/v1/models/{MODEL}")).json()
        wrong = await c.post("/detokenize", json={"model": "nope", "tokens": [1]})
        too_many = await c.post("/detokenize", json={"tokens": [1] * 4097})
    assert prompt == {"count": 2, "max_model_len": 4096, "tokens": [2, 3]}
    assert chat["tokens"] == [1, 2]
    assert both.status_code == 400
    assert text == {"prompt": "t1 t2"}
    assert version["version"].count(".") >= 1
    assert card["root"] == "/models/InternVL3-8B"
    assert wrong.status_code == 404
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.anyio
async def test_large_answers_are_serialized_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import server.chat

    loop_thread = threading.get_ident()
    threads: list[int] = []
    real = server.protocol.completions.Completion.model_dump_json

    def spy(self: Any, *args: Any, **kwargs: Any) -> str:
        threads.append(threading.get_ident())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(server.chat, "LARGE_ANSWER_TOKENS", 0)
    monkeypatch.setattr(server.protocol.completions.Completion, "model_dump_json", spy)
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json=body("a b c"))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "echo: a b c"
    assert threads and all(t != loop_thread for t in threads)


def test_large_answers_are_serialized_item_by_item_to_the_same_json() -> None:
    logprobs = CompletionLogprobs(
        text_offset=[0, 1], tokens=["a", "é"], token_logprobs=[None, -0.5], top_logprobs=[None, {"é": -0.5}]
    )
    choices = [
        CompletionChoice(index=i, text="aé", logprobs=logprobs, finish_reason="length") for i in range(3)
    ]
    usage = Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    completion = Completion(id="cmpl-1", created=1, model="m", choices=choices, usage=usage)
    assert json.loads(dump_in_pieces(completion)) == json.loads(completion.model_dump_json())
    no_usage = json.loads(dump_in_pieces(completion, exclude={"usage"}))
    assert no_usage == json.loads(completion.model_dump_json(exclude={"usage"})) and "usage" not in no_usage
    message = OutputMessage(id="msg", status="completed", content=[OutputTextContent(text="hi")])
    response = ResponseObject(id="r", created_at=0, status="completed", model="m", output=[message])
    assert json.loads(dump_in_pieces(response)) == json.loads(response.model_dump_json())


def test_a_large_answer_is_sent_in_slices_with_its_length() -> None:
    tokens = [f"t{i}" for i in range(30_000)]
    logprobs = CompletionLogprobs(
        text_offset=list(range(30_000)),
        tokens=tokens,
        token_logprobs=[None] + [-0.5] * 29_999,
        top_logprobs=[None] + [{"a": -1.0, "b": -2.0}] * 29_999,
    )
    choices = [
        CompletionChoice(index=i, text="".join(tokens), logprobs=logprobs, finish_reason="length")
        for i in range(2)
    ]
    usage = Usage(prompt_tokens=30_000, completion_tokens=2, total_tokens=30_002)
    completion = Completion(id="cmpl-1", created=1, model="m", choices=choices, usage=usage)

    async def body() -> tuple[int, list[bytes]]:
        response = await json_response(completion)
        return int(response.headers["content-length"]), [piece async for piece in response.body_iterator]

    length, slices = asyncio.run(body())
    assert len(slices) > 2 and max(len(s) for s in slices) <= SEND_SLICE_BYTES
    data = b"".join(slices)
    assert len(data) == length and json.loads(data) == json.loads(completion.model_dump_json())
