"""End-to-end: the real `internvl-serve` on a tiny random checkpoint, driven over loopback with the
official `openai` client, httpx and curl.

The model is random, so its answers are noise: tests check shapes, counts, determinism and
lifecycle, never wording.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from model_runtime.inputs.tiling import choose_grid
from tests.openapi_spec import checked_openai
from tests.server_process import (
    API_KEY,
    KEYED,
    MAIN,
    SERVED_MODEL_NAME,
    ServerProcess,
    SharedServers,
    data_uri,
    image_bytes,
    metric_values,
    mp4_bytes,
    session_servers,
)

pytestmark = pytest.mark.e2e

MODEL_NAME = SERVED_MODEL_NAME
MAX_MODEL_LEN = 4096  # from LEAN_FLAGS
TOKENS_PER_TILE = 256
FRAMES_PER_VIDEO = 8  # the server's default
TILE = 448
MAX_TILES = 12  # the tiny checkpoint's max_dynamic_patch

PHOTO_PNG = data_uri("image/png", image_bytes(64, 48, seed=1))  # 4:3, so tiled as 4x3 plus the thumbnail
SQUARE_PNG = data_uri("image/png", image_bytes(40, 40, seed=2))  # small and square: one tile
WIDE_PNG = data_uri("image/png", image_bytes(2 * TILE, TILE, seed=3))  # a 2x1 grid plus the thumbnail
VIDEO = data_uri("video/mp4", mp4_bytes(frames=16))


def expected_tiles(width: int, height: int, max_tiles: int = MAX_TILES) -> int:
    cols, rows = choose_grid(width, height, min_tiles=1, max_tiles=max_tiles, image_size=TILE)
    return cols * rows + (1 if cols * rows > 1 else 0)


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest) -> SharedServers:
    return session_servers(request)


@pytest.fixture(scope="module")
def server(servers: SharedServers) -> ServerProcess:
    return servers.pool.get(MAIN)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with checked_openai(f"{server.base_url}/v1", timeout=60) as c:
        yield c


def user(*parts: Any) -> dict[str, Any]:
    """A user message; strings become text parts, dicts are passed through."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def image(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def video(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


def image_tokens(usage: Any) -> int:
    """Our `prompt_tokens_details.image_tokens` (a declared field or an extra, by openai version)."""
    return int(usage.prompt_tokens_details.model_dump()["image_tokens"])


def chat(client: openai.OpenAI, *messages: dict[str, Any], **fields: Any) -> Any:
    fields.setdefault("max_tokens", 8)
    fields.setdefault("model", MODEL_NAME)
    return client.chat.completions.create(messages=list(messages), **fields)


# -- completions ---------------------------------------------------------------------------------


def test_sync_completion(client: openai.OpenAI) -> None:
    r = chat(client, {"role": "system", "content": "Be brief."}, user("Hello, who are you?"), max_tokens=6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL_NAME
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = r.usage
    assert 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert image_tokens(usage) == 0


def test_async_client_concurrent_requests(server: ServerProcess) -> None:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60
        ) as c:
            return await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=MODEL_NAME, messages=[user(f"question {i}")], max_tokens=5, temperature=0
                    )
                    for i in range(3)
                )
            )

    results = asyncio.run(run())
    assert len({r.id for r in results}) == 3
    for r in results:
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5


def test_streaming_chunk_sequence(client: openai.OpenAI) -> None:
    """Role chunk, content deltas, the finish_reason chunk, the usage chunk with no choices."""
    messages = [user("Tell me a story.")]
    stream = chat(
        client, *messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in middle)
    assert finish.choices[0].finish_reason in ("stop", "length") and not finish.choices[0].delta.content
    assert usage.choices == [] and usage.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in middle)
    # Greedy decoding: the stream carries exactly the non-streaming answer.
    whole = chat(client, *messages, max_tokens=12, temperature=0)
    assert streamed == whole.choices[0].message.content
    assert usage.usage.completion_tokens == whole.usage.completion_tokens
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens


def test_one_image(client: openai.OpenAI) -> None:
    r = chat(client, user(image(PHOTO_PNG), "Describe the image in detail."))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert expected_tiles(64, 48) == 13
    assert image_tokens(r.usage) == TOKENS_PER_TILE * 13


def test_two_images(client: openai.OpenAI) -> None:
    r = chat(client, user(image(PHOTO_PNG, detail="low"), image(SQUARE_PNG), "What differs?"))
    tiles = 1 + expected_tiles(40, 40)
    assert image_tokens(r.usage) == TOKENS_PER_TILE * tiles


def test_video(client: openai.OpenAI) -> None:
    default = chat(client, user(video(VIDEO), "What happens in the video?"))
    assert image_tokens(default.usage) == TOKENS_PER_TILE * FRAMES_PER_VIDEO
    four = chat(client, user(video(VIDEO, num_frames=4), "What happens in the video?"))
    assert image_tokens(four.usage) == TOKENS_PER_TILE * 4
    assert default.usage.prompt_tokens - four.usage.prompt_tokens > TOKENS_PER_TILE * 4


def test_multi_turn_with_an_image_in_an_earlier_turn(client: openai.OpenAI) -> None:
    first_turn = [user(image(SQUARE_PNG), "What is in the picture?")]
    one = chat(client, *first_turn)
    history = [*first_turn, {"role": "assistant", "content": "A red panda."}, user("What colour is it?")]
    two = chat(client, *history)
    assert two.choices[0].finish_reason in ("stop", "length")
    assert image_tokens(two.usage) == TOKENS_PER_TILE
    assert two.usage.prompt_tokens > one.usage.prompt_tokens
    # Turn 2 re-sends turn 1: its prompt comes from the prefix cache, whole blocks of 16 tokens.
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert one.usage.prompt_tokens - 16 <= cached < two.usage.prompt_tokens and cached % 16 == 0


def test_usage_counts_image_tokens_by_tile(client: openai.OpenAI) -> None:
    """prompt_tokens grows by exactly 256 per extra tile; the image markup itself is a few tokens."""
    text = chat(client, user("Describe it.")).usage
    low = chat(client, user(image(WIDE_PNG, detail="low"), "Describe it.")).usage
    tiles = expected_tiles(2 * TILE, TILE, max_tiles=6)
    assert tiles == 3
    tiled = chat(client, user(image(WIDE_PNG, max_dynamic_patch=6), "Describe it.")).usage
    assert image_tokens(low) == TOKENS_PER_TILE
    assert image_tokens(tiled) == TOKENS_PER_TILE * tiles
    assert tiled.prompt_tokens - low.prompt_tokens == TOKENS_PER_TILE * (tiles - 1)
    markup = low.prompt_tokens - text.prompt_tokens - TOKENS_PER_TILE  # <img>, </img>, a newline
    assert 2 <= markup <= 8, markup


def test_n_choices(client: openai.OpenAI) -> None:
    r = chat(client, user("Write a poem."), n=2, temperature=1.0, seed=7, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens <= 16


def test_stop_string_ends_the_answer(client: openai.OpenAI) -> None:
    messages = [user("Tell me a story.")]
    free = chat(client, *messages, temperature=0, max_tokens=30).choices[0].message.content
    # Pick a stop string from inside the greedy answer, away from its start and from U+FFFD.
    candidates = [free[i : i + 2] for i in range(3, len(free) - 2) if "\ufffd" not in free[i : i + 2]]
    if not candidates:
        pytest.fail(f"the greedy answer has no usable stop string: {free!r}")
    stop = candidates[len(candidates) // 2]
    stopped = chat(client, *messages, temperature=0, max_tokens=30, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == free[: free.index(stop)]


def test_same_seed_same_text_at_temperature_1(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = chat(client, user("Hello, who are you?"), temperature=1.0, seed=seed, max_tokens=16)
        return r.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "different seeds never changed the answer"


def test_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, user("Hello"), temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        top = [t.logprob for t in item.top_logprobs]
        assert top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(top[0], abs=1e-5)


def test_logprob_bytes_rebuild_the_text(client: openai.OpenAI, server: ServerProcess) -> None:
    """Byte-level tokens that are part of a character: `token` says `bytes:\\xNN`, `bytes` are the
    token's own, and the bytes of the answer's tokens are the answer."""
    from model_runtime.loading.tokenizer import load_tokenizer

    added = set(load_tokenizer(server.model).get_added_vocab())
    r = chat(
        client,
        user("Hello"),
        temperature=1.0,
        seed=7,
        max_tokens=64,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    items = r.choices[0].logprobs.content
    partial = [item for item in items if item.token.startswith("bytes:")]
    assert partial, "no token in 64 random ones was part of a character: pick another seed"
    for item in items:
        if item.token.startswith("bytes:"):
            assert item.token == "bytes:" + "".join(f"\\x{b:02x}" for b in item.bytes)
            with pytest.raises(UnicodeDecodeError):
                bytes(item.bytes).decode("utf-8")
        else:
            assert item.bytes == list(item.token.encode("utf-8"))
    text = b"".join(bytes(item.bytes) for item in items if item.token not in added)
    assert text.decode("utf-8", errors="replace") == r.choices[0].message.content


# -- models --------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listing = client.models.list()
    assert [m.id for m in listing.data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.object == "model"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        chat(client, user("hi"), model="no-such-model")


# -- curl ----------------------------------------------------------------------------------------


def curl(*args: str, body: dict[str, Any]) -> str:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        [exe, "-sS", "--fail-with-body", "--max-time", "60", "-H", "Content-Type: application/json",
         "--data-binary", "@-", *args],
        input=json.dumps(body), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def test_curl_non_streaming(server: ServerProcess) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [user(image(SQUARE_PNG), "What is in the picture?")],
        "max_tokens": 5,
    }
    answer = json.loads(curl(f"{server.base_url}/v1/chat/completions", body=body))
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL_NAME
    assert answer["usage"]["prompt_tokens_details"]["image_tokens"] == TOKENS_PER_TILE


def test_curl_streaming(server: ServerProcess) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [user("Hello")],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text = curl("-N", f"{server.base_url}/v1/chat/completions", body=body)
    assert text.endswith("data: [DONE]\n\n")
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    events = [json.loads(b[len("data: ") :]) for b in blocks[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 5


# -- disconnects and metrics ---------------------------------------------------------------------


def wait_for_gauges(server: ServerProcess, within_s: float, **expected: float) -> dict[str, float]:
    deadline = time.monotonic() + within_s
    while True:
        values = server.metrics()
        if all(values[f"internvl:{k}"] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_worker(server: ServerProcess) -> None:
    before = server.metrics()
    body = {
        "model": MODEL_NAME,
        "messages": [user("Tell me a very long story.")],
        "max_tokens": 3000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 4:
                # Still inside the loop: leaving it makes httpx drop the connection.
                during = server.metrics()
                break
    # The stream is closed here, long before 3000 tokens.
    left_at = time.monotonic()
    after = wait_for_gauges(server, 1.0, num_requests_running=0, kv_cache_usage_perc=0)
    freed_in = time.monotonic() - left_at
    assert during["internvl:num_requests_running"] == 1 and during["internvl:kv_cache_usage_perc"] > 0
    assert after["internvl:num_requests_running"] == 0, f"still running {freed_in:.2f} s after the disconnect"
    assert after["internvl:kv_cache_usage_perc"] == 0
    assert after["internvl:num_requests_waiting"] == 0
    disconnected = 'internvl:request_errors_total{error_type="client_disconnected"}'
    assert server.metrics().get(disconnected, 0) == before.get(disconnected, 0) + 1
    finished = "internvl:e2e_request_latency_seconds_count"
    assert after[finished] == before[finished], "counted as a finished request"
    generated = "internvl:generation_tokens_total"
    assert after[generated] > before[generated], "tokens generated before the disconnect are counted"


def test_metrics_are_valid_prometheus_text(server: ServerProcess) -> None:
    text = server.metrics_text()
    values = metric_values(text)  # parses, or raises
    for name in (
        "internvl:time_to_first_token_seconds_count",
        "internvl:inter_token_latency_seconds_count",
        "internvl:e2e_request_latency_seconds_count",
        "internvl:request_queue_time_seconds_count",
        "internvl:num_requests_running",
        "internvl:num_requests_waiting",
        "internvl:kv_cache_usage_perc",
        "internvl:prompt_tokens_total",
        "internvl:generation_tokens_total",
        "internvl:image_tokens_total",
    ):
        assert name in values, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian package 'prometheus'); parsed with prometheus_client only"
        )
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    # Exit 1 is a format error. Exit 3 lists lint problems; the only one we accept is the ':' in our
    # names, which the design asks for (vLLM's `vllm:` style) and which promtool's linter dislikes.
    assert done.returncode in (0, 3), done.stderr + done.stdout
    problems = [p for p in (done.stdout + done.stderr).splitlines() if p.strip()]
    assert [p for p in problems if not p.endswith("metric names should not contain ':'")] == []


# -- API key -------------------------------------------------------------------------------------


def test_api_key_required_on_models_and_completions(servers: SharedServers) -> None:
    keyed = servers.pool.get(KEYED)  # a second server, started with --api-key
    body = {"model": MODEL_NAME, "messages": [user("hi")], "max_tokens": 2}
    with httpx.Client(base_url=keyed.base_url, timeout=30, trust_env=False) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
            for r in (
                c.get("/v1/models", headers=headers),
                c.post("/v1/chat/completions", json=body, headers=headers),
            ):
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert c.get("/health").status_code == 200
    with (
        openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
    with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=API_KEY, max_retries=0) as good_client:
        assert good_client.models.list().data


# -- legacy completions, tokenizer endpoints -----------------------------------------------------


def test_completions_create_text_ids_stream_and_logprobs(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    text = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    (choice,) = text.choices
    assert text.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == text.usage.completion_tokens
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    with httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c:
        ids = c.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
        assert (
            c.post("/detokenize", json={"tokens": ids}).json()["prompt"].endswith("The capital of France is")
        )
    assert len(ids) == text.usage.prompt_tokens
    same = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert same.choices[0].text == choice.text  # the ids are the text's own tokens
    options = {"stream_options": {"include_usage": True}, "echo": True}
    stream = client.completions.create(
        model=MODEL_NAME, prompt=["a", "b"], max_tokens=4, temperature=0, stream=True, **options
    )
    texts: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert texts[0].startswith("a") and texts[1].startswith("b")
    assert usage is not None and usage.completion_tokens <= 8


def test_tokenize_counts_a_chat_as_generation_does(client: openai.OpenAI, server: ServerProcess) -> None:
    messages = [user(image(SQUARE_PNG), "What is in the picture?")]
    with httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c:
        counted = c.post("/tokenize", json={"model": MODEL_NAME, "messages": messages}).json()
        card = c.get(f"/v1/models/{MODEL_NAME}").json()
        version = c.get("/version").json()
    answer = chat(client, *messages, max_tokens=1)
    assert counted["count"] == answer.usage.prompt_tokens == len(counted["tokens"])
    assert counted["max_model_len"] == MAX_MODEL_LEN
    assert card["root"] == str(server.model) and version["version"]


def test_completions_echo_logprobs_score_the_prompt(client: openai.OpenAI) -> None:
    """lm-eval's local-completions log-likelihood request: echo, logprobs=1, max_tokens=1."""

    def score() -> Any:
        return client.completions.create(
            model=MODEL_NAME,
            prompt="The cat sat on the mat",
            echo=True,
            logprobs=1,
            max_tokens=1,
            temperature=0,
        )

    first, again = score(), score()  # the second prompt is in the prefix cache: computed anyway
    logprobs = first.choices[0].logprobs
    prompt_tokens = first.usage.prompt_tokens
    assert len(logprobs.tokens) == prompt_tokens + 1 and first.choices[0].text.startswith(
        "The cat sat on the mat"
    )
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for lp, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert lp <= 0 and len(top) >= 1 and max(top.values()) >= lp - 1e-5
    assert again.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": [-1]},
        {"prompt": [1, 2, -(2**63)]},
        {"prompt": [[1, 2], [-3]]},
        {"prompt": [10**7], "echo": True},
    ],
)
def test_completions_refuse_ids_outside_the_vocabulary(server: ServerProcess, fields: dict[str, Any]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c:
        r = c.post("/v1/completions", json={"model": MODEL_NAME, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


def test_empty_content_array_is_refused(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c:
        r = c.post(
            "/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": []}]}
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_array"


def test_tokenize_counts_tools_and_tool_calls(client: openai.OpenAI, server: ServerProcess) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    with httpx.Client(base_url=server.base_url, timeout=30, trust_env=False) as c:
        counted = c.post("/tokenize", json={"messages": messages, "tools": [tool]}).json()
    answer = chat(client, *messages, tools=[tool], max_tokens=1)
    assert counted["count"] == answer.usage.prompt_tokens
