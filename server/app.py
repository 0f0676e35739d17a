"""create_app(settings, engine): the FastAPI application around one engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from model_runtime.engine_client import EngineClient
from server.chat import ChatService
from server.completions import CompletionService
from server.errors import install_error_handlers
from server.loop_monitor import LoopLagMonitor
from server.media import MediaFetcher
from server.metrics import Metrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware, DrainMiddleware, RequestContextMiddleware
from server.protocol import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.protocol.extensions import DetokenizeRequest, TokenizeRequest
from server.protocol.responses import ResponseRequest
from server.responses import ResponseService
from server.routes import router
from server.settings import Settings
from server.state import ServerState
from server.tokens import TokenService

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


def create_app(
    settings: Settings,
    engine: EngineClient,
    *,
    default_model_name: str | None = None,
    fetcher: MediaFetcher | None = None,
) -> FastAPI:
    """The app serving `engine`. The engine's lifetime belongs to the caller (the CLI starts it
    before and shuts it down after); the lifespan here closes what the app itself opened."""
    names = list(settings.served_model_name) or [default_model_name or _name_from_model(settings.model)]
    loop_lag = LoopLagMonitor(settings.max_event_loop_lag_s)
    metrics = Metrics(names[0], engine, loop_lag, names=settings.metrics_names)
    fetcher = fetcher or MediaFetcher(settings)
    chat = ChatService(settings, engine, fetcher, metrics, names)
    state = ServerState(
        settings=settings,
        engine=engine,
        model_names=names,
        metrics=metrics,
        fetcher=fetcher,
        chat=chat,
        completions=CompletionService(settings, chat, metrics),
        responses=ResponseService(settings, chat, metrics),
        tokens=TokenService(settings, chat, fetcher),
        loop_lag=loop_lag,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("serving model(s) %s", ", ".join(names))
        state.loop_lag.start()
        try:
            yield
        finally:
            await state.loop_lag.stop()
            await fetcher.aclose()

    app = FastAPI(
        title="internvl-serve",
        lifespan=lifespan,
        middleware=_middleware(settings, state),
        docs_url=None,
        redoc_url=None,
        # Accept JSON bodies sent without a Content-Type, as OpenAI's API does.
        strict_content_type=False,
    )
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    _document_request_bodies(
        app, [ChatCompletionRequest, CompletionRequest, ResponseRequest, TokenizeRequest, DetokenizeRequest]
    )
    return app


def _document_request_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Routes that parse their bodies themselves (server/request_parsing.py) refer to their models
    by name in /openapi.json; this puts those models (and what they use) into its components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def begin_drain(app: FastAPI) -> None:
    """From now on: /health is 503 and new requests get 503; in-flight ones carry on."""
    app.state.server.draining = True


def _middleware(settings: Settings, state: ServerState) -> list[Middleware]:
    """Outermost first. CORS sits outside the key check so browsers' preflights are answered."""
    public = {HEALTH_PATH} if settings.metrics_require_auth else {HEALTH_PATH, METRICS_PATH}
    stack = [Middleware(RequestContextMiddleware)]
    if settings.cors_allow_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allow_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        )
    stack += [
        Middleware(DrainMiddleware, is_draining=lambda: state.draining, exempt={HEALTH_PATH, METRICS_PATH}),
        Middleware(APIKeyMiddleware, api_keys=settings.api_keys, public_paths=public),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s),
    ]
    return stack


def _name_from_model(model: str | None) -> str:
    """Fallback served name: the --model value as given (as vLLM does)."""
    return model or "internvl"
