"""An app around a FakeEngine and an in-process client for it that checks every answer against
OpenAI's spec (tests/openapi_spec.py): the harness of the API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from server.app import create_app
from server.media import MediaFetcher
from server.settings import Settings
from tests.fakes import FakeEngine
from tests.openapi_spec import SpecCheckingClient

MODEL = "fake-model"


def make_app(
    engine: FakeEngine | None = None, fetcher: MediaFetcher | None = None, **overrides: Any
) -> FastAPI:
    settings = Settings(served_model_name=[MODEL, "org/alias"], **overrides)
    return create_app(settings, engine or FakeEngine(), fetcher=fetcher)


@asynccontextmanager
async def client(app: FastAPI, **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with SpecCheckingClient(transport=transport, base_url="http://test", headers=headers) as c:
            yield c
