"""/tokenize and /detokenize: the served tokenizer over HTTP, with prompts built exactly as
generation builds them (a chat's template, image and video tokens included)."""

from __future__ import annotations

from model_runtime.request import ChatInput
from server.chat import ChatService, fetch_media, plan_messages, with_tools
from server.completions import as_prompt_error
from server.errors import BadRequestError
from server.media import MediaFetcher
from server.protocol.chat import ChatCompletionRequest
from server.protocol.extensions import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.settings import Settings


class TokenService:
    def __init__(self, settings: Settings, chat: ChatService, fetcher: MediaFetcher) -> None:
        self._settings = settings
        self._chat = chat
        self._fetcher = fetcher

    def _check(self, model: str | None) -> None:
        if model is not None:
            self._chat.resolve_model(model)
        self._chat.check_ready()

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self._check(req.model)
        engine = self._chat.engine
        if (req.prompt is None) == (req.messages is None):
            raise BadRequestError(
                "Send exactly one of 'prompt' (a text, tokenized as completions use it) and 'messages' "
                "(a chat, through the model's template).",
                param="prompt",
                code="invalid_value",
            )
        if req.prompt is not None:
            try:
                ids = await engine.tokenize(ChatInput(messages=(), prompt=req.prompt))
            except Exception as exc:
                raise as_prompt_error(exc) from None
        else:
            chat = ChatCompletionRequest(model=req.model or "", messages=req.messages or [], tools=req.tools)
            planned = plan_messages(chat, self._settings, engine.info)
            ids = await engine.tokenize(with_tools(await fetch_media(planned, self._fetcher), chat))
        return TokenizeResponse(count=len(ids), max_model_len=engine.info.max_model_len, tokens=ids)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check(req.model)
        return DetokenizeResponse(prompt=await self._chat.engine.detokenize(req.tokens))
