"""Protocol models: OpenAI's request shapes in, sampling parameters out, response shapes exact."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from model_runtime.errors import InvalidRequestError
from model_runtime.sampling_params import SamplingParams
from server.errors import format_loc, from_validation_errors
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    DeltaMessage,
    ImagePart,
    TextPart,
    VideoPart,
)


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_string_content_becomes_one_text_part() -> None:
    req = request()
    assert req.messages[0].content == [TextPart(type="text", text="hi")]


def test_content_parts_and_extensions() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/c.png", "max_dynamic_patch": 4},
                        },
                        {"type": "video_url", "video_url": {"url": "https://x/v.mp4", "num_frames": 16}},
                    ],
                },
                {"role": "assistant", "content": None},
            ],
        }
    )
    parts = req.messages[1].content or []
    assert isinstance(parts[1], ImagePart) and parts[1].image_url.detail == "low"
    assert isinstance(parts[2], ImagePart) and parts[2].image_url.url == "https://x/b.png"
    assert parts[2].image_url.detail == "auto"
    assert isinstance(parts[3], ImagePart) and parts[3].image_url.max_dynamic_patch == 4
    assert isinstance(parts[4], VideoPart) and parts[4].video_url.num_frames == 16
    assert req.messages[2].content is None


def test_unknown_fields_ignored_and_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="server.protocol"):
        req = request(x_frontend_hint=1, another_unknown=True)
    assert not hasattr(req, "x_frontend_hint")
    assert "x_frontend_hint" in caplog.text and "another_unknown" in caplog.text


def test_to_sampling_params_defaults() -> None:
    assert request().to_sampling_params() == SamplingParams()
    assert request().to_sampling_params(default_max_tokens=64).max_tokens == 64


def test_to_sampling_params_maps_every_field() -> None:
    params = request(
        temperature=0.2, top_p=0.9, n=3, seed=7, stop="END", presence_penalty=0.5, frequency_penalty=-0.5,
        logprobs=True, top_logprobs=2, top_k=40, min_p=0.05, repetition_penalty=1.1, stop_token_ids=[2],
        ignore_eos=True, max_tokens=20,
    ).to_sampling_params()  # fmt: skip
    assert params == SamplingParams(
        n=3, max_tokens=20, temperature=0.2, top_p=0.9, top_k=40, min_p=0.05, seed=7, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=("END",), stop_token_ids=(2,), logprobs=True,
        top_logprobs=2, ignore_eos=True,
    )  # fmt: skip


def test_max_completion_tokens_preferred() -> None:
    req = request(max_tokens=10, max_completion_tokens=20)
    assert req.to_sampling_params().max_tokens == 20 and req.max_tokens_param == "max_completion_tokens"
    assert request(max_tokens=10).max_tokens_param == "max_tokens"


def test_stop_string_or_list() -> None:
    assert request(stop="x").stop == ["x"]
    assert request(stop=["x", "y"]).to_sampling_params().stop == ("x", "y")


def test_include_usage_only_when_streaming() -> None:
    assert request(stream=True, stream_options={"include_usage": True}).include_usage
    assert not request(stream=False, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "u", "num_frames": 0}}]}]},  # noqa: E501
         "messages[0].content[0].video_url.num_frames"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "n": "many"}, "n"),
        ({"messages": "hi"}, "messages"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", **body})
    err = from_validation_errors(info.value.errors())
    assert err.param == param and err.status_code == 400
    assert param in err.message


def test_format_loc() -> None:
    assert format_loc(("messages", 0, "content", 1, "image_url", "image_url", "url")) == (
        "messages[0].content[1].image_url.url"
    )
    assert format_loc(("stop", "list[str]", 0)) == "stop[0]"


def test_delta_omits_unset_fields() -> None:
    def delta(**fields: Any) -> dict[str, Any]:
        chunk = ChatCompletionChunk(
            id="c", created=1, model="m", choices=[ChunkChoice(index=0, delta=DeltaMessage(**fields))]
        )
        return chunk.model_dump()["choices"][0]["delta"]

    assert delta(role="assistant", content="") == {"role": "assistant", "content": ""}
    assert delta(content="x") == {"content": "x"}
    assert delta() == {}


_number = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False))


@given(
    temperature=_number,
    top_p=_number,
    n=_number,
    top_k=_number,
    seed=_number,
    max_tokens=_number,
    top_logprobs=_number,
)
def test_any_numbers_give_valid_params_or_an_error_naming_a_field(**fields: Any) -> None:
    """Whatever numbers arrive: a 400 naming a field, or parameters the engine can trust."""
    try:
        params = request(**fields).to_sampling_params().validate(max_n=8)
    except ValidationError as exc:
        assert from_validation_errors(exc.errors()).param in fields
        return
    except InvalidRequestError as exc:
        assert exc.param is not None
        return
    assert 1 <= params.n <= 8 and 0 <= params.temperature <= 2 and 0 <= params.top_p <= 1
