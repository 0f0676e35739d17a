"""Function tools in the format each model family was trained on: prompt text, call grammar, parsing.

Two formats, chosen by the checkpoint's tokenizer (InternLM2's has `<|action_start|>` and
`<|plugin|>`; every other InternVL LLM gets the first):

- **Hermes / Qwen2.5** (InternVL2.5 and 3 on Qwen2.5; also the best-effort choice for the Phi-3,
  Yi and Llama-3 checkpoints, whose LLMs have no tool format of their own): the tool list is
  appended to the system message as Qwen2.5-Instruct's chat template writes it
  (tokenizer_config.json `chat_template`; QwenLM/Qwen2.5 docs/source/framework/function_call.md;
  Qwen-Agent qwen_agent/llm/fncall_prompts/nous_fncall_prompt.py), each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, and consecutive tool results are
  one user turn of `<tool_response>\\n...\\n</tool_response>` blocks.
- **InternLM2** (InternVL2 and 2.5 at 2B/8B/26B, InternVL3-9B): the tools are a second system turn
  `<|im_start|>system name=<|plugin|>` holding the functions as a JSON list, a call is
  `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`, a result an
  `environment name=<|plugin|>` turn (InternLM/InternLM chat/chat_format.md, "Function Call";
  serialization as InternLM's own server writes it: lmdeploy/model.py, InternLM2Chat7B).

JSON is written as json.dumps writes it by default, non-ASCII kept: what both templates produce.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_runtime.request import ToolCall, ToolSpec
from model_runtime.structured.schema import close_objects

# Inside grammars: JSON as json.dumps writes it (structured/grammar.py's JSON_OPTIONS).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _function(tool: ToolSpec) -> dict[str, Any]:
    """The function object as the client sent it (its keys, in its order)."""
    if tool.raw is not None:
        return tool.raw
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    return function


def _arguments(call: ToolCall) -> Any:
    """A call's arguments as the object the templates serialize (clients send a JSON string)."""
    try:
        return json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        return call.arguments


def _schema(tool: ToolSpec) -> str:
    schema = close_objects(tool.parameters) if tool.parameters else {"type": "object"}
    schema["x-guidance"] = {**_JSON_STYLE, "lenient": not tool.strict}
    return dumps(schema)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


class ToolFormat:
    """How one model family writes tools, calls and results; see the module docstring."""

    name: str
    call_start: str  # the text that opens a call: what a streaming parser watches for
    call_end: str | None  # the text that closes one, if it reaches the answer's text
    skip_special_tokens: bool = True  # False where the call markers are special tokens
    stop_after_call: str | None = None  # a token that ends the answer after a call

    def system_suffix(self, tools: Sequence[ToolSpec]) -> str:
        return ""

    def tools_turn(self, tools: Sequence[ToolSpec]) -> tuple[str, str] | None:
        return None

    def calls_text(self, content: str, calls: Sequence[ToolCall]) -> str:
        raise NotImplementedError

    def result_turns(self, results: Sequence[str], user_role: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def grammar(self, tools: Sequence[ToolSpec], *, parallel: bool) -> str:
        """A Lark grammar of one call (or several, when `parallel`) to any of `tools`."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole answer; if any call is malformed, the whole answer is
        content and there are no calls (a tool_calls object is never invalid)."""
        raise NotImplementedError

    def clean(self, content: str) -> str:
        return content


class HermesFormat(ToolFormat):
    name = "hermes"
    call_start = "<tool_call>"
    call_end = "</tool_call>"

    _BLOCK_HEAD = (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    )
    _BLOCK_TAIL = (
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call>'
    )
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def system_suffix(self, tools: Sequence[ToolSpec]) -> str:
        listed = "".join("\n" + dumps({"type": "function", "function": _function(t)}) for t in tools)
        return self._BLOCK_HEAD + listed + self._BLOCK_TAIL

    def calls_text(self, content: str, calls: Sequence[ToolCall]) -> str:
        blocks = [
            f"<tool_call>\n{dumps({'name': c.name, 'arguments': _arguments(c)})}\n</tool_call>" for c in calls
        ]
        return "\n".join(([content] if content else []) + blocks)

    def result_turns(self, results: Sequence[str], user_role: str) -> list[tuple[str, str]]:
        return [(user_role, "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results))]

    def grammar(self, tools: Sequence[ToolSpec], *, parallel: bool) -> str:
        rules = []
        for i, tool in enumerate(tools):
            head = _lark_string('<tool_call>\n{"name": ' + dumps(tool.name) + ', "arguments": ')
            tail = _lark_string("}\n</tool_call>")
            rules.append(f"call_{i}: {head} %json{_schema(tool)} {tail}")
        call = "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return "\n".join([start, call, *rules]) + "\n"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.call_start not in text:
            return text, []
        calls: list[ParsedCall] = []
        for closed, open_ in self._CALL.findall(text):
            call = _parse_call(closed or open_, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        content = text[: text.index(self.call_start)].strip()
        return content or None, calls


class InternLM2Format(ToolFormat):
    name = "internlm2"
    call_start = "<|action_start|>"
    call_end = None  # <|action_end|> stops the answer (stop_after_call): it is never in the text
    skip_special_tokens = False
    stop_after_call = "<|action_end|>"

    _OPEN = "<|action_start|><|plugin|>"
    _MARKERS = re.compile(r"<\|(?:action_start|action_end|plugin|interpreter|im_start|im_end)\|>")

    def tools_turn(self, tools: Sequence[ToolSpec]) -> tuple[str, str] | None:
        return "<|im_start|>system name=<|plugin|>\n", dumps([_function(t) for t in tools])

    def calls_text(self, content: str, calls: Sequence[ToolCall]) -> str:
        calls_json = [dumps({"name": c.name, "parameters": _arguments(c)}) for c in calls]
        return content + "".join(f"{self._OPEN}\n{text}<|action_end|>" for text in calls_json)

    def result_turns(self, results: Sequence[str], user_role: str) -> list[tuple[str, str]]:
        return [("<|im_start|>environment name=<|plugin|>\n", r) for r in results]

    def grammar(self, tools: Sequence[ToolSpec], *, parallel: bool) -> str:
        # The model makes one call per turn (the format has no way to chain them).
        rules = []
        for i, tool in enumerate(tools):
            head = _lark_string('\n{"name": ' + dumps(tool.name) + ', "parameters": ')
            body = f'{head} %json{_schema(tool)} "}}"'
            rules.append(f"call_{i}: <|action_start|> <|plugin|> {body} <|action_end|>")
        return "\n".join(["start: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules]) + "\n"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self._OPEN not in text:
            return self.clean(text), []
        head, *bodies = text.split(self._OPEN)
        calls: list[ParsedCall] = []
        for body in bodies:
            call = _parse_call(body.split("<|action_end|>")[0], "parameters", "arguments")
            if call is None:
                return self.clean(text), []
            calls.append(call)
        content = self.clean(head).strip()
        return content or None, calls

    def clean(self, content: str) -> str:
        return self._MARKERS.sub("", content)


def _parse_call(body: str, *keys: str) -> ParsedCall | None:
    try:
        data = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = next((data[k] for k in keys if k in data), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(data["name"], dumps(arguments))


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), InternLM2Format())}


def format_for(vocabulary: Sequence[str]) -> ToolFormat:
    """The tool format of a checkpoint whose tokenizer has these added tokens."""
    names = set(vocabulary)
    return FORMATS["internlm2"] if {"<|action_start|>", "<|plugin|>"} <= names else FORMATS["hermes"]
