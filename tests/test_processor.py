"""The processor works cheapest first: limits refuse before pixels are decoded or text tokenized."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from model_runtime.config import EngineConfig
from model_runtime.errors import MediaTimeoutError, PromptTooLongError
from model_runtime.inputs import processor as processor_module
from model_runtime.inputs.processor import Processor
from model_runtime.loading.checkpoint import load_checkpoint
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.request import ChatInput, ImageInput, Message
from model_runtime.sampling_params import SamplingParams


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    noise = np.random.default_rng(width * height).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("processor"))
    return load_checkpoint(EngineConfig(model=str(path), max_model_len=2048))


def processor(loaded, **config) -> Processor:
    return Processor(loaded, EngineConfig(model="unused", max_model_len=2048, **config))


def user(*parts) -> ChatInput:
    return ChatInput((Message("user", parts),))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, loaded):
    """Fails the test if any pixel is decoded or any prompt tokenized."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work was done before the limit refused the request")

    monkeypatch.setattr(processor_module, "load_image", forbidden)
    monkeypatch.setattr(processor_module, "load_video", forbidden)
    monkeypatch.setattr(processor_module, "build_prompt", forbidden)


def test_a_long_text_is_refused_before_it_is_tokenized(loaded, no_work) -> None:
    with pytest.raises(PromptTooLongError, match="at least") as info:
        processor(loaded).process("r", user("word " * 200_000), SamplingParams(max_tokens=8))
    assert info.value.param == "messages"


def test_tool_calls_and_tools_count_before_tokenizing(loaded, no_work) -> None:
    """Arguments in the history and tool descriptions are rendered into the prompt: a long one is
    refused by the lower bound too (pretty-printed JSON counted at its compact size)."""
    from model_runtime.request import ToolCall, ToolSpec

    arguments = json.dumps({"text": "word " * 100_000}, indent=4)
    history = ChatInput(
        (
            Message("user", ("hi",)),
            Message("assistant", (), tool_calls=(ToolCall("c1", "f", arguments),)),
            Message("tool", ("ok",), tool_call_id="c1"),
        )
    )
    tools = ChatInput((Message("user", ("hi",)),), tools=(ToolSpec("f", description="word " * 100_000),))
    for chat in (history, tools):
        with pytest.raises(PromptTooLongError, match="at least"):
            processor(loaded).process("r", chat, SamplingParams(max_tokens=8))


def test_too_many_image_tokens_are_refused_from_the_headers_alone(loaded, no_work) -> None:
    images = tuple(ImageInput(png(1200, 900), max_tiles=12) for _ in range(3))
    with pytest.raises(PromptTooLongError, match="image tokens"):
        processor(loaded).process("r", user(*images, "describe"), SamplingParams(max_tokens=8))


def test_the_output_budget_counts_too(loaded, no_work) -> None:
    with pytest.raises(PromptTooLongError, match="max_tokens 2000"):
        processor(loaded).process(
            "r", user(ImageInput(png(448, 448), max_tiles=1), "hi"), SamplingParams(max_tokens=2000)
        )


def test_text_that_normalization_shortens_is_judged_by_its_normalized_size(loaded) -> None:
    """A tokenizer whose normalizer collapses whitespace (as SentencePiece's option does) turns a
    megabyte of spaces into a few tokens: the raw size alone must not refuse it."""
    proc = processor(loaded)
    text = "x" + " " * 1_000_000
    with pytest.raises(PromptTooLongError):
        proc.plan(user(text), SamplingParams(max_tokens=8))
    proc.normalize = lambda t: " ".join(t.split())
    plan = proc.plan(user(text), SamplingParams(max_tokens=8))
    assert plan.media == []


def test_a_slow_decode_is_refused_with_the_medium_named(loaded) -> None:
    slow = processor(loaded, media_decode_timeout_s=1e-9)
    chat = user("look", ImageInput(png(800, 600), max_tiles=2))
    with pytest.raises(MediaTimeoutError, match="media_decode_timeout_s") as info:
        slow.process("r", chat, SamplingParams(max_tokens=8))
    assert info.value.param == "messages[0].content[1]"


def test_cache_salts_keep_tenants_apart(loaded) -> None:
    chat = user(ImageInput(png(448, 448), max_tiles=1), "hi")
    params = SamplingParams(max_tokens=8)
    proc = processor(loaded)
    plain, same, salted, other = (
        proc.process("a", chat, params),
        proc.process("b", chat, params),
        proc.process("c", chat, params, cache_salt="tenant-1"),
        proc.process("d", chat, params, cache_salt="tenant-2"),
    )
    assert plain.images[0].key == same.images[0].key and plain.cache_root == same.cache_root
    keys = {r.images[0].key for r in (plain, salted, other)}
    roots = {r.cache_root for r in (plain, salted, other)}
    assert len(keys) == 3 and len(roots) == 3
    assert "tenant" not in "".join(keys)  # salts are hashed, never stored as sent


def test_normalizing_in_pieces_never_counts_more_than_the_whole(loaded, monkeypatch) -> None:
    """The piecewise count (which bounds memory) stays a lower bound of the whole text's bytes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(processor_module, "_NORMALIZE_PIECE", 5)
    proc = processor(loaded)
    alphabet = ["\u1100", "\u1161", "\u11a8", "e", "\u0301", "\u0323", " ", "\t", "a", "\n", "ﬁ", "가"]

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet=st.sampled_from(alphabet), max_size=80))
    def check(text: str) -> None:
        assert proc._normalized_bytes(text) <= len(proc.normalize(text).encode("utf-8"))

    check()
