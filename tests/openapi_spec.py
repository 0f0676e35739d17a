"""OpenAI's published OpenAPI document (the chat-completions subset, copied unchanged into data/),
as jsonschema validators: every response, chunk and error body the tests see is checked against it.

The document is OpenAPI 3.1 but marks optional nulls the 3.0 way (`nullable: true`), which plain JSON
Schema ignores; each such schema becomes `anyOf: [itself, null]` here.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from hypothesis import HealthCheck, settings

DATA = Path(__file__).resolve().parent / "data" / "openai-openapi"
SPECS = [DATA / "chat-completions-subset.json", DATA / "completions-responses-subset.json"]


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        enum = node.get("enum")
        if enum is not None and None not in enum:
            node["enum"] = [*enum, None]
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for spec in SPECS:  # cut from the same document: a schema in both is the same schema
        schemas.update(json.loads(spec.read_text())["components"]["schemas"])
    return _nullable(copy.deepcopy({"schemas": schemas}))


@functools.cache
def validator(schema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": _components()}
    )


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Each Responses stream event's `type` -> the name of its schema."""
    schemas = _components()["schemas"]
    events = {}
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        kind = schemas[name]["properties"]["type"]
        for value in kind.get("enum", [kind.get("const")]):
            events[value] = name
    return events


def event_schema(kind: str) -> str:
    assert kind in _event_schemas(), f"{kind!r} is not a Responses stream event type"
    return _event_schemas()[kind]


def violations(schema: str, instance: Any) -> list[str]:
    """Where `instance` breaks OpenAI's `schema` (empty when it conforms)."""
    return [f"{e.json_path}: {e.message[:200]}" for e in validator(schema).iter_errors(instance)]


def assert_conforms(schema: str, instance: Any) -> None:
    problems = violations(schema, instance)
    assert not problems, f"{schema}: " + "; ".join(problems)


def _sse_payloads(text: str) -> list[Any]:
    payloads = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[len("data: ") :]))
    return payloads


def _check_completion(payload: dict[str, Any], *, streamed: bool) -> None:
    """CreateCompletionResponse, read as OpenAI writes it: an echoed prompt's first token has a null
    logprob and null alternatives (nothing precedes it), and a streamed chunk's finish_reason is
    null until its choice ends; the spec types the former as numbers and objects and has no
    stream schema for the latter."""
    for choice in payload["choices"]:
        logprobs = choice.get("logprobs") or {}
        if logprobs.get("token_logprobs") and logprobs["token_logprobs"][0] is None:
            logprobs["token_logprobs"][0] = 0.0
            logprobs["top_logprobs"][0] = {}
        if streamed:
            assert choice["finish_reason"] in (None, "stop", "length"), choice
            if choice["finish_reason"] is None:
                choice["finish_reason"] = "stop"
    assert_conforms("CreateCompletionResponse", payload)


def check_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Check one HTTP answer of the OpenAI routes against the spec: errors (any route) against
    ErrorResponse; chat completions, streamed chunk by chunk or whole; model listings."""
    if not path.startswith("/v1/") or (method == "HEAD" and status < 400):
        return
    if status >= 400:
        assert_conforms("ErrorResponse", json.loads(body))
        return
    if path == "/v1/chat/completions" and method == "POST":
        if content_type.startswith("text/event-stream"):
            for payload in _sse_payloads(body.decode()):
                schema = "ErrorResponse" if "error" in payload else "CreateChatCompletionStreamResponse"
                assert_conforms(schema, payload)
        else:
            assert_conforms("CreateChatCompletionResponse", json.loads(body))
    elif path == "/v1/completions" and method == "POST":
        if content_type.startswith("text/event-stream"):
            for payload in _sse_payloads(body.decode()):
                if "error" in payload:
                    assert_conforms("ErrorResponse", payload)
                else:
                    _check_completion(payload, streamed=True)
        else:
            _check_completion(json.loads(body), streamed=False)
    elif path == "/v1/responses" and method == "POST":
        if content_type.startswith("text/event-stream"):
            for payload in _sse_payloads(body.decode()):
                assert_conforms(event_schema(payload["type"]), payload)
        else:
            assert_conforms("Response", json.loads(body))
    elif path.startswith("/v1/responses/") and method == "GET":
        assert_conforms("Response", json.loads(body))
    elif path == "/v1/models" and method == "GET":
        assert_conforms("ListModelsResponse", json.loads(body))
    elif path.startswith("/v1/models/") and method == "GET":
        assert_conforms("Model", json.loads(body))


class SpecCheckingClient(httpx.AsyncClient):
    """An httpx client that checks every whole answer it receives with `check_response` (streams
    opened with `.stream()` are read by the test at its own pace and left alone)."""

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        response = await super().send(request, stream=stream, **kwargs)
        if not stream:
            check_response(
                request.method,
                request.url.path,
                response.status_code,
                response.headers.get("content-type", ""),
                response.content,
            )
        return response


class SpecCheckingTransport(httpx.HTTPTransport):
    """For clients that take an httpx client (openai's): every answer is read whole and checked
    with `check_response` before the client sees it."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        body = response.read()
        check_response(
            request.method,
            request.url.path,
            response.status_code,
            response.headers.get("content-type", ""),
            body,
        )
        return httpx.Response(
            response.status_code, headers=response.headers, content=body, extensions=response.extensions
        )


def checked_openai(base_url: str, timeout: float = 120) -> Any:
    """The official openai client over SpecCheckingTransport: every answer it gets is checked.
    `base_url` ends in /v1."""
    import openai

    checked = httpx.Client(transport=SpecCheckingTransport(), timeout=timeout, trust_env=False)
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=checked)


def fuzz_settings(max_examples: int) -> settings:
    """How the schema fuzzers (OpenAI's request schemas, our /openapi.json) run: reproducible (the
    same cases every run, none remembered between runs), no per-case deadline (a case is an HTTP
    round trip), no health check (schema strategies are slow to draw by nature)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
