"""The endpoints, each a few lines; the work lives in ServerState and ChatService."""

from __future__ import annotations

from importlib.metadata import version as package_version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from server.protocol.completions import Completion, CompletionRequest
from server.protocol.extensions import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from server.protocol.responses import DeletedResponse, ResponseObject, ResponseRequest
from server.request_parsing import parse_request
from server.state import ServerState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)
}


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


def _json_body(model: type[BaseModel]) -> dict[str, object]:
    """The OpenAPI requestBody of a route that parses its body itself (server/request_parsing.py);
    app.py moves the model's $defs into the document's components."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra=_json_body(ChatCompletionRequest),
)
async def create_chat_completion(request: Request) -> Response:
    state = _state(request)
    body = await parse_request(await request.body(), ChatCompletionRequest, state.body_limits)
    return await state.chat.create(body, request)


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra=_json_body(CompletionRequest),
)
async def create_completion(request: Request) -> Response:
    state = _state(request)
    body = await parse_request(await request.body(), CompletionRequest, state.body_limits)
    return await state.completions.create(body, request)


@router.post(
    "/v1/responses",
    response_model=ResponseObject,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra=_json_body(ResponseRequest),
)
async def create_response(request: Request) -> Response:
    state = _state(request)
    body = await parse_request(await request.body(), ResponseRequest, state.body_limits)
    return await state.responses.create(body, request)


@router.get("/v1/responses/{response_id}", responses=_ERRORS)
async def retrieve_response(response_id: str, request: Request) -> ResponseObject:
    return _state(request).responses.retrieve(response_id)


@router.delete("/v1/responses/{response_id}", responses=_ERRORS)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    return _state(request).responses.delete(response_id)


@router.post("/tokenize", responses=_ERRORS, openapi_extra=_json_body(TokenizeRequest))
async def tokenize(request: Request) -> TokenizeResponse:
    state = _state(request)
    body = await parse_request(await request.body(), TokenizeRequest, state.body_limits)
    return await state.tokens.tokenize(body)


@router.post("/detokenize", responses=_ERRORS, openapi_extra=_json_body(DetokenizeRequest))
async def detokenize(request: Request) -> DetokenizeResponse:
    state = _state(request)
    body = await parse_request(await request.body(), DetokenizeRequest, state.body_limits)
    return await state.tokens.detokenize(body)


@router.get("/version")
@router.head("/version", include_in_schema=False)
async def version() -> VersionResponse:
    return VersionResponse(version=package_version("internvl-serve"))


@router.get("/v1/models", responses=_ERRORS)
@router.head("/v1/models", include_in_schema=False)
async def list_models(request: Request) -> ModelList:
    return _state(request).model_list()


@router.get("/v1/models/{model_id:path}", responses=_ERRORS)
@router.head("/v1/models/{model_id:path}", include_in_schema=False)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return _state(request).model_card(model_id)


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    """200 only when the engine is ready, the server not draining and its event loop not lagging."""
    state = _state(request)
    status = state.status
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


@router.get("/metrics")
@router.head("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
