"""Prompt building: a conversation with images and videos -> prompt text -> token ids.

Follows the model cards' `chat()`: image placeholders are written into the user text, the
conversation is rendered with the checkpoint's template, each placeholder is expanded to
`<img>` + `<IMG_CONTEXT>` x 256 per tile + `</img>`, and the whole string is tokenized in one call.

Unlike `chat()`, a `<image>` typed by a client is plain text: placeholders come only from the
message's media parts, through a private sentinel that client text may not contain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from model_runtime.errors import InvalidRequestError
from model_runtime.inputs.templates import ConversationTemplate, render
from model_runtime.inputs.tools import FORMATS, ToolFormat
from model_runtime.request import ImageInput, Message, ToolSpec, VideoInput

# NUL characters cannot come out of a tokenizer's vocabulary as text we write, and a client sending
# this exact string is refused, so every occurrence in a built prompt is one of ours.
IMAGE_PLACEHOLDER = "\x00<image>\x00"

IMG_START = "<img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMG_END = "</img>"


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer that prompt building uses."""

    def __call__(self, text: str, *, return_tensors: None = None) -> Any: ...


@dataclass(frozen=True)
class PromptSpec:
    """A tokenized prompt and where its images are.

    `slot_tiles[k]` is the tile count of the k-th image slot (an image, or one video frame), in
    prompt order; `image_spans[k]` is (index of its first `<IMG_CONTEXT>` id, number of such ids),
    which is where the runner writes that slot's vision features.
    """

    text: str
    input_ids: tuple[int, ...]
    image_token_count: int
    slot_tiles: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Image-context tokens per tile after pixel shuffle (256 for 448 / 14 / 0.5), as the reference."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def _media_prefix(media: Sequence[ImageInput | VideoInput], tiles: Sequence[list[int]]) -> str:
    """Placeholder lines that precede one user message's text, as the model cards write them.

    One image: `<image>\\n`. Several images: `Image-1: <image>\\nImage-2: <image>\\n`. One video:
    `Frame1: <image>\\n...FrameF: <image>\\n` (the 2-1B and 3-1B cards' spelling). Any other mix (a
    video with images, or several videos) is not in the cards; we number images `Image-k:` and put a
    `Video-k:\\n` line before each video's frame lines, counting images and videos separately.
    """
    images = sum(isinstance(m, ImageInput) for m in media)
    videos = len(media) - images
    if videos == 0:
        if images == 1:
            return IMAGE_PLACEHOLDER + "\n"
        return "".join(f"Image-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, images + 1))
    lines: list[str] = []
    image_k = video_k = 0
    for item, item_tiles in zip(media, tiles, strict=True):
        if isinstance(item, ImageInput):
            image_k += 1
            lines.append(f"Image-{image_k}: {IMAGE_PLACEHOLDER}\n")
            continue
        video_k += 1
        if len(media) > 1:
            lines.append(f"Video-{video_k}:\n")
        lines.extend(f"Frame{f}: {IMAGE_PLACEHOLDER}\n" for f in range(1, len(item_tiles) + 1))
    return "".join(lines)


def _text_of(message: Message, *, allow_media: bool) -> tuple[str, list[ImageInput | VideoInput]]:
    texts: list[str] = []
    media: list[ImageInput | VideoInput] = []
    for part in message.parts:
        if isinstance(part, str):
            if IMAGE_PLACEHOLDER in part:
                raise InvalidRequestError(
                    "message text contains a reserved character sequence", param="messages"
                )
            texts.append(part)
        elif allow_media:
            media.append(part)
        else:
            raise InvalidRequestError(
                f"{message.role} messages may contain only text, not images or videos", param="messages"
            )
    return "\n".join(texts), media


def build_prompt_text(
    template: ConversationTemplate,
    messages: Sequence[Message],
    media_tiles: Sequence[list[int]],
    *,
    tools: Sequence[ToolSpec] = (),
    tool_format: ToolFormat | None = None,
) -> str:
    """The rendered conversation, with one IMAGE_PLACEHOLDER per image slot, ending in an open assistant turn.

    System messages (wherever they are) are joined with "\\n" and replace the template's default;
    none keeps the default. Each user message is one user turn: its media placeholders first, in
    order, then its text parts joined with "\\n". Each assistant message is an assistant turn in
    place, so history renders as the reference's (question, answer) pairs; an empty message renders
    as the bare role, as the reference does. `media_tiles[i]` lists the tile count of each slot the
    i-th media item (conversation order) produces: [tiles] for an image, one entry per video frame.

    `tools` are written as `tool_format` says (inputs/tools.py), and so are the tool calls of
    assistant messages and the results in "tool" messages (which need no `tools` to render).
    """
    fmt = tool_format or FORMATS["hermes"]
    system_parts: list[str] = []
    turns: list[tuple[str, str | None]] = []
    results: list[str] = []
    media_index = 0
    for message in messages:
        text, media = _text_of(message, allow_media=message.role == "user")
        if message.role == "tool":
            results.append(text)
            continue
        if results:  # a run of tool results ends
            turns.extend(fmt.result_turns(results, template.user_role))
            results = []
        if message.role == "system":
            system_parts.append(text)
        elif message.role == "assistant":
            if message.tool_calls:
                text = fmt.calls_text(text, message.tool_calls)
            turns.append((template.assistant_role, text))
        else:
            tiles = media_tiles[media_index : media_index + len(media)]
            assert len(tiles) == len(media), "media_tiles has fewer entries than media items"
            for item, item_tiles in zip(media, tiles, strict=True):
                assert item_tiles, "every media item produces at least one image slot"
                assert isinstance(item, VideoInput) or len(item_tiles) == 1, "an image is one slot"
            media_index += len(media)
            prefix = _media_prefix(media, tiles) if media else ""
            turns.append((template.user_role, prefix + text))
    if results:
        turns.extend(fmt.result_turns(results, template.user_role))
    assert media_index == len(media_tiles), "media_tiles has more entries than media items"
    turns.append((template.assistant_role, None))
    system_message = "\n".join(system_parts) if system_parts else None
    if tools:
        suffix = fmt.system_suffix(tools)
        if suffix:
            system_message = (template.system_message if system_message is None else system_message) + suffix
        tools_turn = fmt.tools_turn(tools)
        if tools_turn is not None:
            turns.insert(0, tools_turn)
    return render(template, system_message, turns)


def slot_tile_counts(media_tiles: Sequence[list[int]]) -> list[int]:
    """Tile counts of every image slot in prompt order (media_tiles flattened)."""
    return [tiles for item in media_tiles for tiles in item]


def expand_image_slots(
    prompt_text: str,
    tile_counts: Sequence[int],
    *,
    tokens_per_tile: int,
    img_start: str = IMG_START,
    img_context: str = IMG_CONTEXT,
    img_end: str = IMG_END,
) -> str:
    """Replace each IMAGE_PLACEHOLDER, in order, by `<img>` + `<IMG_CONTEXT>` x (n * tiles) + `</img>`.

    A count that does not match the placeholders is a bug in the caller, hence an assertion.
    """
    pieces = prompt_text.split(IMAGE_PLACEHOLDER)
    assert len(pieces) - 1 == len(tile_counts), "one tile count per image placeholder"
    out = [pieces[0]]
    for tiles, piece in zip(tile_counts, pieces[1:], strict=True):
        out.append(img_start + img_context * (tokens_per_tile * tiles) + img_end)
        out.append(piece)
    return "".join(out)


def tokenize_prompt(
    tokenizer: Tokenizer,
    text: str,
    *,
    image_context_id: int,
    expected_image_tokens: int,
    marker_counts: Mapping[int, int] | None = None,
) -> list[int]:
    """Token ids of the whole prompt, tokenized in one call with the tokenizer's defaults.

    One call, as the reference: InternLM2 tokenizers add `<s>`, Qwen2's add nothing, and splitting
    the text could change merges at the seams. Added tokens typed by the client (`<IMG_CONTEXT>`,
    `<img>`, ...) become special ids here; a wrong image-context count is a 400 rather than vision
    features landing on the wrong tokens. `marker_counts` ({id of `<img>`: slots, id of `</img>`:
    slots}) extends the check to the image delimiters.
    """
    input_ids: list[int] = list(tokenizer(text, return_tensors=None)["input_ids"])
    expected = {image_context_id: expected_image_tokens, **(marker_counts or {})}
    if any(input_ids.count(token_id) != count for token_id, count in expected.items()):
        raise InvalidRequestError(
            "the prompt's image tokens do not match its images; message text may not contain "
            "image marker tokens such as <IMG_CONTEXT>, <img> or </img>",
            param="messages",
        )
    return input_ids


def _context_runs(input_ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = -1
    for i, tok in enumerate(input_ids):
        if tok == token_id and start < 0:
            start = i
        elif tok != token_id and start >= 0:
            runs.append((start, i - start))
            start = -1
    if start >= 0:
        runs.append((start, len(input_ids) - start))
    return runs


def build_prompt(
    template: ConversationTemplate,
    messages: Sequence[Message],
    media_tiles: Sequence[list[int]],
    tokenizer: Tokenizer,
    *,
    tokens_per_tile: int,
    image_context_id: int,
    image_start_id: int | None = None,
    image_end_id: int | None = None,
    tools: Sequence[ToolSpec] = (),
    tool_format: ToolFormat | None = None,
) -> PromptSpec:
    """Text, ids and image spans of a conversation: the whole pipeline of this module in one call.

    With `image_start_id`/`image_end_id` given, client text containing `<img>`/`</img>` is refused
    too (see tokenize_prompt).
    """
    slots = slot_tile_counts(media_tiles)
    text = expand_image_slots(
        build_prompt_text(template, messages, media_tiles, tools=tools, tool_format=tool_format),
        slots,
        tokens_per_tile=tokens_per_tile,
    )
    expected = tokens_per_tile * sum(slots)
    markers = {i: len(slots) for i in (image_start_id, image_end_id) if i is not None}
    input_ids = tokenize_prompt(
        tokenizer,
        text,
        image_context_id=image_context_id,
        expected_image_tokens=expected,
        marker_counts=markers,
    )
    spans = _context_runs(input_ids, image_context_id)
    # Each slot sits between its own <img> and </img>, so with the counts right the runs line up.
    assert [n for _, n in spans] == [tokens_per_tile * t for t in slots], "image spans do not match slots"
    return PromptSpec(
        text=text,
        input_ids=tuple(input_ids),
        image_token_count=expected,
        slot_tiles=tuple(slots),
        image_spans=tuple(spans),
    )
