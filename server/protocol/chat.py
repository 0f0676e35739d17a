"""Pydantic models of OpenAI's chat-completions API, fields in the order of OpenAI's reference.

Requests accept and ignore unknown fields (frontends send many) and log them at debug. Our
extensions are fenced in marked sections. Range checks live in `SamplingParams.validate`, so that
one place names the offending field.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from model_runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIRequestModel(BaseModel):
    """Base of request models: unknown fields are logged at debug and dropped; known fields are
    typed strictly, as OpenAI does ("8" is not an integer, "yes" not a boolean)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and logger.isEnabledFor(logging.DEBUG):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                logger.debug("ignoring unknown fields in %s: %s", cls.__name__, unknown)
        return data


# ---------------------------------------------------------------------------------------------
# Request: messages and their content parts.


class ImageURL(OpenAIRequestModel):
    """An image by URL: https://, http:// or data:image/...;base64."""

    url: str
    detail: Literal["auto", "low", "high"] = "auto"
    # --- extension: tiles for this image, clamped to the server's ceiling ---
    max_dynamic_patch: int | None = Field(None, ge=1)


class VideoURL(OpenAIRequestModel):
    """A video by URL: https://, http:// or data:video/...;base64."""

    url: str
    # --- extensions: frames sampled and tiles per frame, clamped to the server's ceilings ---
    num_frames: int | None = Field(None, ge=1)
    max_dynamic_patch: int | None = Field(None, ge=1)


class TextPart(OpenAIRequestModel):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImagePart(OpenAIRequestModel):
    """An image content part."""

    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise PydanticCustomError("invalid_type", 'image_url must be an object: {"url": "..."}')
        return value


class VideoPart(OpenAIRequestModel):
    """Extension: OpenAI has no video input; the shape follows vLLM's `video_url`."""

    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise PydanticCustomError("invalid_type", 'video_url must be an object: {"url": "..."}')
        return value


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCallIn(OpenAIRequestModel):
    name: str
    arguments: str = ""


class ToolCallIn(OpenAIRequestModel):
    """A tool call an earlier assistant message made (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(OpenAIRequestModel):
    """One message; a string `content` is stored as a single text part."""

    # "developer" is OpenAI's newer name for "system".
    role: Literal["developer", "system", "user", "assistant", "tool"]
    content: list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @field_validator("content", mode="before")
    @classmethod
    def _string_content(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class JSONSchemaSpec(OpenAIRequestModel):
    """response_format.json_schema: the schema the answer must match."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(OpenAIRequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(OpenAIRequestModel):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(OpenAIRequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(OpenAIRequestModel):
    """A function the model may call; `parameters` is a JSON schema of its arguments object."""

    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: Any) -> Any:
        # The prompt lists each function as the client wrote it (its keys, in its order).
        model = handler(data)
        if isinstance(data, dict):
            model._raw = dict(data)
        return model

    @property
    def raw(self) -> dict[str, Any]:
        return self._raw or self.model_dump(exclude_none=True)


class ToolDef(OpenAIRequestModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIRequestModel):
    name: str


class NamedToolChoice(OpenAIRequestModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(OpenAIRequestModel):
    """Options of a streaming response."""

    include_usage: bool = False


# ---------------------------------------------------------------------------------------------
# Request: what chat completions and legacy completions share.


class SamplingRequest(OpenAIRequestModel):
    """The sampling fields of chat and legacy completions (OpenAI's names, then vLLM's extensions);
    subclasses add their input, their output limit and their logprobs."""

    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None  # a single string is accepted and stored as a list
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None

    # --- extensions (vLLM's names) ---
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    """keeps this request's images and prompt prefixes apart in the caches from requests without the
    same salt, so that response times cannot tell one tenant what another has sent"""

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(
                    f"keys must be token ids (non-negative integers as strings), not {key[:40]!r}"
                )
        return value

    @property
    def max_tokens_param(self) -> str:
        """The name the client used for the output limit, for error messages."""
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            n=1 if self.n is None else self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
        )


# ---------------------------------------------------------------------------------------------
# Request: the body of POST /v1/chat/completions.


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[ToolDef] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, *, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's settings; not yet validated (call `.validate()`)."""
        max_tokens = self.requested_max_tokens
        return self._sampling_params(
            default_max_tokens if max_tokens is None else max_tokens,
            bool(self.logprobs),
            self.top_logprobs or 0,
        )


# ---------------------------------------------------------------------------------------------
# Responses.

FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    """One alternative token at a position, with its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """One generated token's log-probability and the top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Log-probabilities of a choice's tokens."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class PromptTokensDetails(BaseModel):
    """Breakdown of the prompt tokens."""

    cached_tokens: int = 0
    # --- extension: how many of prompt_tokens are image/video tokens ---
    image_tokens: int = 0


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class GroundingBox(BaseModel):
    """Extension: one box of a grounded answer (server/grounding.py)."""

    label: str | None
    image_index: int | None  # which image of the request (in order), None if it has none
    box: list[int | float]  # x1, y1, x2, y2 in the model's 0..1000 space
    box_pixels: list[int] | None  # the same box in that image's pixels


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text of an object


class ToolCallOut(BaseModel):
    """A call the model made, in a non-streaming message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ResponseMessage(BaseModel):
    """The assistant message of a non-streaming choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    # --- extension: boxes of a grounded answer; absent when there are none ---
    grounding: list[GroundingBox] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("tool_calls", "grounding"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class FunctionCallChunk(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallChunk(BaseModel):
    """A piece of a call in a streamed delta: index, id, type and name first, then arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallChunk | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Choice(BaseModel):
    """One choice of a non-streaming response."""

    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The non-streaming response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    """What a streamed chunk adds to a choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None
    # --- extension: on a choice's last chunk, the boxes of its grounded answer ---
    grounding: list[GroundingBox] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role", "content"}, {"content"} or {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    """One choice's part of a streamed chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streaming response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A served model, as listed by /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "internvl-serve"
    # --- extensions (vLLM's names) ---
    root: str  # the checkpoint this id serves: a directory or hub id, as given to --model
    max_model_len: int


class ModelList(BaseModel):
    """The answer of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """The body of an error: message, type, offending param, code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail
