"""Request bodies -> typed requests: cheap limits first, and off the event loop when large.

FastAPI would decode and validate a body on the event loop, and a 16 MB body of empty messages
stalls every other request (and /health) for seconds before it can be refused. Here a body over
LARGE_BODY_BYTES is decoded and checked on a worker thread instead, and whatever its size, the
limits that cost nothing are checked on the raw JSON before pydantic builds a single model:
counts of messages, content parts, tools, logit_bias entries, stop strings and stop token ids,
the bytes of message text, and text that cannot be encoded (lone UTF-16 surrogates, which JSON
allows as escapes and UTF-8 does not).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from model_runtime.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS
from server.errors import BadRequestError, from_validation_errors
from server.protocol.completions import MAX_PROMPTS

LARGE_BODY_BYTES = 256 * 1024
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class BodyLimits:
    """Counts a request may carry (see the settings of the same names)."""

    max_messages: int
    max_content_parts: int
    max_stop_token_ids: int
    max_text_bytes: int = 4 * 1024 * 1024
    max_tools: int = 128
    # Token ids in one prompt (completions) or one /detokenize call: the model's context length,
    # which no prompt can exceed anyway; None = unchecked.
    max_prompt_tokens: int | None = None


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _text_bytes(messages: list[Any]) -> int:
    """UTF-8 bytes of the messages' text: string contents and text parts, tool calls' arguments
    (chat's tool_calls, the Responses API's function_call items) and tool results."""
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += _utf8(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    total += _utf8(text)
        for key in ("output", "arguments"):  # a tool's result; a function_call item's arguments
            if isinstance(message.get(key), str):
                total += _utf8(message[key])
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                total += _utf8(arguments)
    return total


def _tool_bytes(tools: list[Any]) -> int:
    """Bytes the tools' descriptions and parameter schemas add to the prompt (chat's
    {"function": {...}} and the Responses API's flat tools alike)."""
    total = 0
    for tool in tools:
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict):
            continue
        for key in ("name", "description"):
            if isinstance(spec.get(key), str):
                total += _utf8(spec[key])
        if spec.get("parameters") is not None:
            total += _utf8(json.dumps(spec["parameters"], separators=(",", ":"), ensure_ascii=False))
    return total


def _too_many(what: str, count: int, limit: int, param: str, code: str) -> BadRequestError:
    return BadRequestError(f"Too many {what}: {count}; at most {limit} per request.", param=param, code=code)


def _check_text(text: int, limits: BodyLimits, param: str) -> None:
    if text > limits.max_text_bytes:
        raise BadRequestError(
            f"The request holds {text} bytes of text; at most {limits.max_text_bytes} per request.",
            param=param,
            code="text_too_long",
        )


def _check_token_ids(ids: list[Any], limits: BodyLimits, param: str) -> None:
    """A list of token ids longer than the context is refused before pydantic reads every id."""
    limit = limits.max_prompt_tokens
    if limit is not None and len(ids) > limit:
        raise BadRequestError(
            f"The {param} has {len(ids)} tokens; this model's context is {limit} tokens.",
            param=param,
            code="context_length_exceeded",
        )


def _check_prompt(prompt: Any, limits: BodyLimits) -> None:
    """Legacy completions' prompt: a text, texts, token ids or lists of them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        _check_token_ids(prompt, limits, "prompt")
    elif isinstance(prompt, list):
        for item in prompt:
            if isinstance(item, list):
                _check_token_ids(item, limits, "prompt")
    if isinstance(prompt, str):
        _check_text(_utf8(prompt), limits, "prompt")
        return
    if not isinstance(prompt, list):
        return
    if prompt and not all(isinstance(p, int) for p in prompt) and len(prompt) > MAX_PROMPTS:
        raise _too_many("prompts", len(prompt), MAX_PROMPTS, "prompt", "too_many_prompts")
    size = 0
    for item in prompt:
        if isinstance(item, str):
            size += _utf8(item)
        elif isinstance(item, list):
            size += len(item)  # a token id stands for at least a byte of text
        else:
            size += 1
    _check_text(size, limits, "prompt")


def check_counts(data: Any, limits: BodyLimits) -> None:
    """The count limits on the raw JSON of a chat, completions or responses request (before any
    model is built): the Responses API's `input` items count as messages."""
    if not isinstance(data, dict):
        return  # the model validation says what is wrong with it
    if "prompt" in data:
        _check_prompt(data["prompt"], limits)
    if isinstance(data.get("tokens"), list):  # /detokenize
        _check_token_ids(data["tokens"], limits, "tokens")
    for key in ("input", "instructions"):  # the Responses API's texts
        if isinstance(data.get(key), str):
            _check_text(_utf8(data[key]), limits, key)
    messages = data.get("messages")
    where = "messages"
    if messages is None and isinstance(data.get("input"), list):
        messages, where = data["input"], "input"  # the Responses API's items
    tools = data.get("tools")
    if isinstance(tools, list) and len(tools) > limits.max_tools:
        raise _too_many("tools", len(tools), limits.max_tools, "tools", "too_many_tools")
    tool_text = _tool_bytes(tools) if isinstance(tools, list) else 0
    _check_text(tool_text, limits, "tools")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise _too_many(where, len(messages), limits.max_messages, where, "too_many_messages")
        parts = sum(
            len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        if parts > limits.max_content_parts:
            raise _too_many("content parts", parts, limits.max_content_parts, where, "too_many_content_parts")
        _check_text(_text_bytes(messages) + tool_text, limits, where)
    bias = data.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS:
        raise _too_many("logit_bias entries", len(bias), MAX_LOGIT_BIAS, "logit_bias", "too_many_logit_bias")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequestError(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP_STRINGS}, but "
            f"got an array with length {len(stops)} instead.",
            param="stop",
            code="array_above_max_length",
        )
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequestError(
            f"Stop strings may be at most {MAX_STOP_CHARS} characters long.",
            param="stop",
            code="invalid_value",
        )
    ids = data.get("stop_token_ids")
    if isinstance(ids, list) and len(ids) > limits.max_stop_token_ids:
        raise _too_many(
            "stop token ids", len(ids), limits.max_stop_token_ids, "stop_token_ids", "too_many_stop_token_ids"
        )


def find_unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) that UTF-8 cannot encode, or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return where or "body"
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def _not_json(constant: str) -> Any:
    """Python's decoder takes NaN and Infinity, which JSON does not have (a NaN temperature passed
    every range check)."""
    raise json.JSONDecodeError(f"{constant} is not a JSON number", constant, 0)


def parse_body(body: bytes, model: type[Model], limits: BodyLimits) -> Model:
    """Decode, check and validate one body (blocking: run it off the loop when the body is large)."""
    if not body.strip():
        raise BadRequestError("A JSON request body is required.", code="missing_body")
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequestError("The request body is not valid JSON.", code="invalid_json") from None
    except ValueError:  # an integer literal beyond Python's digit limit for conversions
        raise BadRequestError(
            "The request body holds a number with too many digits.", code="invalid_json"
        ) from None
    except RecursionError:
        raise BadRequestError("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequestError(
            "The request body must be a JSON object (Content-Type: application/json).", code="invalid_body"
        )
    check_counts(data, limits)
    bad = find_unencodable(data)
    if bad is not None:
        raise BadRequestError(
            f"Invalid value for '{bad}': the text contains a lone UTF-16 surrogate (not valid Unicode).",
            param=bad,
            code="invalid_value",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


async def parse_request(body: bytes, model: type[Model], limits: BodyLimits) -> Model:
    """parse_body, on a worker thread when the body is large so the event loop stays free.

    Large bodies are parsed one at a time: json.loads holds the GIL for the whole of a body (about
    0.3 s for 16 MB), so parsers on several threads would take turns with the event loop between
    them; eight at once kept /health waiting over a second. One at a time, the loop waits at most
    for one body, and the bodies finish no later in total (they never ran in parallel)."""
    if len(body) > LARGE_BODY_BYTES:
        async with _large_bodies():
            return await asyncio.to_thread(parse_body, body, model, limits)
    return parse_body(body, model, limits)


_GATES: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _large_bodies() -> asyncio.Semaphore:
    """The event loop's gate for large bodies (one per loop: tests run several)."""
    loop = asyncio.get_running_loop()
    gate = _GATES.get(loop)
    if gate is None:
        for old in [other for other in _GATES if other.is_closed()]:
            del _GATES[old]
        gate = _GATES[loop] = asyncio.Semaphore(1)
    return gate
