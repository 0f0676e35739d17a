"""Tools in each family's trained format: prompt bytes, parsing, call grammars, streamed calls."""

from __future__ import annotations

import pytest

from model_runtime.inputs.prompt import build_prompt_text
from model_runtime.inputs.templates import TEMPLATES
from model_runtime.inputs.tools import FORMATS, format_for
from model_runtime.request import Message, ToolCall, ToolSpec
from server.tool_stream import ToolCallStream

WEATHER = {
    "name": "get_weather",
    "description": "Get weather. <b>&'",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "城市"}},
        "required": ["city"],
    },
}
TOOL = ToolSpec("get_weather", WEATHER["description"], WEATHER["parameters"], raw=WEATHER)
HISTORY = (
    Message("system", ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",)),
    Message("user", ("Weather in 北京 and Paris?",)),
    Message(
        "assistant",
        ("Let me check.",),
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "北京"}'),
            ToolCall("call_2", "get_weather", '{"city": "Paris"}'),
        ),
    ),
    Message("tool", ('{"temp": 20}',), tool_call_id="call_1"),
    Message("tool", ('{"temp": 15}',), tool_call_id="call_2"),
)


def test_hermes_prompt_is_qwen25_chat_template_byte_for_byte() -> None:
    # Rendered with Qwen2.5-Instruct's own chat template (jinja2, transformers' tojson) for the
    # same conversation; internvl2_5 is the same ChatML.
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function "
        "signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Get weather. <b>&\'", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}}, '
        '"required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object with function '
        "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in 北京 and Paris?<|im_end|>\n"
        "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response>\n<tool_response>\n'
        '{"temp": 15}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    text = build_prompt_text(
        TEMPLATES["internvl2_5"], HISTORY, [], tools=[TOOL], tool_format=FORMATS["hermes"]
    )
    assert text == expected


def test_internlm2_prompt_follows_internlm_chat_format() -> None:
    history = (HISTORY[1], HISTORY[2], HISTORY[3])
    text = build_prompt_text(
        TEMPLATES["internvl2_5"], history, [], tools=[TOOL], tool_format=FORMATS["internlm2"]
    )
    system = TEMPLATES["internvl2_5"].system_message
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>system name=<|plugin|>\n"
        '[{"name": "get_weather", "description": "Get weather. <b>&\'", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string", "description": "城市"}}, "required": ["city"]}}]'
        "<|im_end|>\n"
        "<|im_start|>user\nWeather in 北京 and Paris?<|im_end|>\n"
        "<|im_start|>assistant\nLet me check.<|action_start|><|plugin|>\n"
        '{"name": "get_weather", "parameters": {"city": "北京"}}<|action_end|><|action_start|><|plugin|>\n'
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|><|im_end|>\n'
        '<|im_start|>environment name=<|plugin|>\n{"temp": 20}<|im_end|>\n<|im_start|>assistant\n'
    )


def test_without_a_system_message_the_template_default_gets_the_tools() -> None:
    text = build_prompt_text(
        TEMPLATES["internvl2_5"], HISTORY[1:2], [], tools=[TOOL], tool_format=FORMATS["hermes"]
    )
    assert text.startswith(f"<|im_start|>system\n{TEMPLATES['internvl2_5'].system_message}\n\n# Tools\n\n")


def test_the_format_follows_the_tokenizer() -> None:
    assert format_for(["<|im_start|>", "<img>"]).name == "hermes"
    assert format_for(["<|action_start|>", "<|plugin|>", "<|im_end|>"]).name == "internlm2"


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        ("hermes", "Just text.", "Just text.", []),
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": "{\\"b\\": \\"é\\"}"}\n</tool_call>',
            "Sure.",
            [("f", '{"a": 1}'), ("g", '{"b": "é"}')],
        ),
        (
            "hermes",
            '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',
            None,
            [("f", '{"a": 1}')],
        ),  # cut short
        (
            "hermes",
            '<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>',
            None,
            [],
        ),  # malformed: all text
        (
            "internlm2",
            'Let me see.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"q": "x"}}',
            "Let me see.",
            [("f", '{"q": "x"}')],
        ),
        ("internlm2", "plain <|im_end|>", "plain ", []),
    ],
)
def test_parse(fmt: str, text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    parsed_content, parsed = FORMATS[fmt].parse(text)
    if calls:
        assert parsed_content == content
    else:
        assert parsed_content == (content if content is not None else text)
    assert [(c.name, c.arguments) for c in parsed] == calls


def _stream(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[int, str, str]]]:
    stream = ToolCallStream(FORMATS[fmt])
    content, calls = "", []
    for piece in pieces:
        text, done = stream.feed(piece)
        content += text
        calls += done
    text, done = stream.finish()
    return content + text, [(c.index, c.call.name, c.call.arguments) for c in calls + done]


def test_streamed_calls_split_anywhere_give_the_same_result() -> None:
    text = (
        'I will call.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    )
    whole = _stream("hermes", [text])
    assert whole == ("I will call.\n", [(0, "f", '{"a": 1}'), (1, "g", "{}")])
    for cut in range(1, len(text)):
        assert _stream("hermes", [text[:cut], text[cut:]]) == whole
    by_char = _stream("hermes", list(text))
    assert by_char == whole


def test_text_that_only_looks_like_a_marker_is_content() -> None:
    assert _stream("hermes", ["a <tool", "_x> b"]) == ("a <tool_x> b", [])
    assert _stream("hermes", ["ends with <tool"]) == ("ends with <tool", [])


def test_a_malformed_streamed_call_arrives_as_content() -> None:
    content, calls = _stream("hermes", ['<tool_call>\n{"name": "f", "argu', 'ments": oops}\n</tool_call>'])
    assert calls == [] and "oops" in content


@pytest.mark.parametrize(
    ("fmt", "family"), [("hermes", "qwen2"), ("hermes", "phi3"), ("internlm2", "internlm2")]
)
def test_call_grammars_compile_for_the_family_tokenizer(fmt: str, family: str, tmp_path) -> None:
    from llguidance import LLMatcher

    from model_runtime.loading.tiny_tokenizers import write_tokenizer
    from model_runtime.loading.tokenizer import load_tokenizer
    from model_runtime.structured.tokenizer import build_ll_tokenizer

    write_tokenizer(tmp_path, family)
    tokenizer = load_tokenizer(tmp_path)
    ll = build_ll_tokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for parallel in (False, True):
        grammar = FORMATS[fmt].grammar([TOOL, ToolSpec("noop")], parallel=parallel)
        assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar), ll) == ""
