"""Requests generated from OpenAI's own request schemas (tests/data/openai-openapi), sent to the app
around a FakeEngine: whatever OpenAI's spec allows a client to send, the answer is never a 5xx, and
every answer (200 or error, whole or streamed) conforms to OpenAI's response schemas (checked by
the client, tests/app_client.py). The body's `model` is set to the served name, so that requests
reach the engine instead of all ending as 404s.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
import schemathesis
from hypothesis import given

from tests.app_client import MODEL, client, make_app
from tests.fakes import FakeEngine
from tests.openapi_spec import SPECS, fuzz_settings

# (path, request schema, examples, served at least): chat gets the most examples; the Responses
# API's requests are mostly hosted tools, stored prompts and conversations, which are refused.
OPERATIONS = [
    ("/v1/chat/completions", "CreateChatCompletionRequest", 120, 20),
    ("/v1/completions", "CreateCompletionRequest", 80, 12),
    ("/v1/responses", "CreateResponse", 60, 6),
]


def _document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for spec in SPECS:
        schemas.update(json.loads(spec.read_text())["components"]["schemas"])
    paths = {
        path: {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
                },
                "responses": {"200": {"description": "checked by the client"}},
            }
        }
        for path, schema, _, _ in OPERATIONS
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "OpenAI (subset)", "version": "2.3.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


@pytest.mark.parametrize(("path", "schema", "examples", "served"), OPERATIONS)
def test_whatever_openai_allows_gets_a_conforming_answer(
    path: str, schema: str, examples: int, served: int
) -> None:
    api = schemathesis.openapi.from_dict(_document())
    (operation,) = [r.ok() for r in api.get_all_operations() if r.ok().path == path]
    app = make_app(FakeEngine())
    statuses: collections.Counter[int] = collections.Counter()

    async def send(body: Any) -> int:
        async with client(app) as c:  # checks every answer against OpenAI's spec
            response = await c.post(path, json=body)
        return response.status_code

    @fuzz_settings(examples)
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        body = case.body
        if isinstance(body, dict):
            body = {**body, "model": MODEL}
            if path == "/v1/responses":
                # OpenAI's schema lets `input` be left out (for stored prompts and conversations,
                # which this server refuses by name); a request that can be served has one.
                body.setdefault("input", "hello")
        status = asyncio.run(send(body))
        statuses[status] += 1
        assert status < 500, (status, body)

    call()
    # Enough generated requests are served, not refused, for the answers' checks to mean something.
    assert statuses[200] >= served, dict(statuses)
