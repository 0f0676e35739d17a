"""Endpoints outside OpenAI's API that clients of vLLM rely on: /tokenize, /detokenize, /version.
Load generators (guidellm) and evaluation tools count tokens with them instead of loading the
model's tokenizer themselves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.protocol.chat import ChatMessage, OpenAIRequestModel, ToolDef


class TokenizeRequest(OpenAIRequestModel):
    """POST /tokenize: a completions `prompt` as is, or chat `messages` through the model's
    template (images and videos fetched and counted exactly as a chat request would)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDef] | None = None  # rendered into the prompt, as chat renders them
    add_special_tokens: Literal[True] = True  # the tokenizer's defaults, as generation uses them


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIRequestModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
