"""Pydantic models of OpenAI's Responses API (POST /v1/responses, GET and DELETE
/v1/responses/{id}), fields in the order of OpenAI's reference.

What a Responses request can say that a chat request can, it is translated into (server/responses.py)
and served by the same code; what it cannot (hosted tools, reasoning, background runs,
conversations, files by id) is refused by name, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer

from server.protocol.chat import OpenAIRequestModel

# ---------------------------------------------------------------------------------------------
# Request: input items and their content.


class InputText(OpenAIRequestModel):
    type: Literal["input_text"]
    text: str


class InputImage(OpenAIRequestModel):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] = "auto"
    # --- extension (as chat's image_url.max_dynamic_patch) ---
    max_dynamic_patch: int | None = Field(None, ge=1)


class InputVideo(OpenAIRequestModel):
    """Extension: a video, as chat's video_url part."""

    type: Literal["input_video"]
    video_url: str
    num_frames: int | None = Field(None, ge=1)
    max_dynamic_patch: int | None = Field(None, ge=1)


class InputFile(OpenAIRequestModel):
    type: Literal["input_file"]


class OutputText(OpenAIRequestModel):
    """An earlier answer's text, sent back as history."""

    type: Literal["output_text"]
    text: str


class Refusal(OpenAIRequestModel):
    type: Literal["refusal"]
    refusal: str


InputContent = Annotated[
    InputText | InputImage | InputVideo | InputFile | OutputText | Refusal, Field(discriminator="type")
]


class MessageItem(OpenAIRequestModel):
    """EasyInputMessage, InputMessage and an earlier OutputMessage alike."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(OpenAIRequestModel):
    """A function call the model made earlier, sent back as history."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIRequestModel):
    """The result of a function call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputContent]
    id: str | None = None
    status: str | None = None


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]
SUPPORTED_ITEMS = ("message", "function_call", "function_call_output")


# ---------------------------------------------------------------------------------------------
# Request: tools and output format.


class FunctionTool(OpenAIRequestModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = True  # the Responses API's default, unlike chat's


class ToolChoiceFunction(OpenAIRequestModel):
    type: Literal["function"]
    name: str


class TextFormatText(OpenAIRequestModel):
    type: Literal["text"]


class TextFormatJSONObject(OpenAIRequestModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(OpenAIRequestModel):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")
]


class TextConfig(OpenAIRequestModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseStreamOptions(OpenAIRequestModel):
    include_obfuscation: bool | None = None


# ---------------------------------------------------------------------------------------------
# Request: the body of POST /v1/responses.


class ResponseRequest(OpenAIRequestModel):
    """POST /v1/responses."""

    model: str
    input: str | list[InputItem]
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: ResponseStreamOptions | None = None
    temperature: float | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["disabled"] | None = None
    user: str | None = None
    # Fields of features this server does not have: refused by name when set (server/responses.py).
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    reasoning: Any = None

    # --- extensions (vLLM's names) ---
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)

    @field_validator("input", mode="before")
    @classmethod
    def _item_types(cls, value: Any) -> Any:
        """Messages may omit `type`; any other item type names a feature this server lacks."""
        if not isinstance(value, list):
            return value
        items = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                kind = item.get("type", "message")
                if kind not in SUPPORTED_ITEMS:
                    raise ValueError(
                        f"input[{i}] has type {str(kind)[:40]!r}; this server accepts "
                        f"{', '.join(SUPPORTED_ITEMS)} items"
                    )
                item = {**item, "type": kind}
            items.append(item)
        return items

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return value


# ---------------------------------------------------------------------------------------------
# The response object and its output items.


class OutputTextContent(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ResponseLogprob] = Field(default_factory=list)  # filled when include asks for them


class ResponseTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ResponseLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ResponseTopLogprob] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextContent]
    status: Literal["in_progress", "completed", "incomplete"]


class FunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # --- extension: how many of input_tokens are image/video tokens ---
    image_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseErrorBody(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The Response: what POST returns (whole, or inside stream events) and GET reads back."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    completed_at: int | None = None
    error: ResponseErrorBody | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: None = None
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None  # usage and user are left out when absent: the spec has no null for them
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("user", "usage"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


OutputTextContent.model_rebuild()
