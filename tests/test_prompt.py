"""Prompt building: media placeholders, image-slot expansion and one-call tokenization."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model_runtime.errors import InvalidRequestError
from model_runtime.inputs.prompt import (
    IMAGE_PLACEHOLDER,
    build_prompt,
    build_prompt_text,
    expand_image_slots,
    slot_tile_counts,
    tokenize_prompt,
    tokens_per_tile,
)
from model_runtime.inputs.templates import get_template
from model_runtime.request import ImageInput, Message, VideoInput

P = IMAGE_PLACEHOLDER
IMG = ImageInput(b"img")
VID = VideoInput(b"vid")
SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"]


def user_turn(*parts: str | ImageInput | VideoInput, tiles: list[list[int]]) -> str:
    """The user turn's content as rendered with Hermes-2 (no default-prompt noise in assertions)."""
    text = build_prompt_text(get_template("Hermes-2"), [Message("user", parts)], tiles)
    head = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    return text[head : text.index("<|im_end|>", head)]


def test_one_image() -> None:
    assert user_turn(IMG, "What?", tiles=[[3]]) == f"{P}\nWhat?"


def test_media_come_first_whatever_the_client_order() -> None:
    assert user_turn("What?", IMG, tiles=[[3]]) == f"{P}\nWhat?"


def test_several_images_are_numbered() -> None:
    assert user_turn(IMG, "Compare", IMG, tiles=[[1], [2]]) == f"Image-1: {P}\nImage-2: {P}\nCompare"


def test_image_numbering_restarts_per_message() -> None:
    messages = [
        Message("user", (IMG, IMG, "a")),
        Message("assistant", ("b",)),
        Message("user", (IMG, IMG, "c")),
    ]
    text = build_prompt_text(get_template("Hermes-2"), messages, [[1], [1], [1], [1]])
    assert text.count("Image-1: ") == 2 and text.count("Image-2: ") == 2 and "Image-3" not in text


def test_video_frames() -> None:
    assert (
        user_turn(VID, "What happens?", tiles=[[1, 1, 1]])
        == f"Frame1: {P}\nFrame2: {P}\nFrame3: {P}\nWhat happens?"
    )


def test_video_with_other_media() -> None:
    content = user_turn(IMG, VID, "Both?", tiles=[[5], [1, 1]])
    assert content == f"Image-1: {P}\nVideo-1:\nFrame1: {P}\nFrame2: {P}\nBoth?"
    two_videos = user_turn(VID, VID, "x", tiles=[[1], [1]])
    assert two_videos == f"Video-1:\nFrame1: {P}\nVideo-2:\nFrame1: {P}\nx"


def test_text_parts_joined_with_newline() -> None:
    assert user_turn("a", "b", tiles=[]) == "a\nb"


def test_typed_image_tag_stays_text() -> None:
    text = build_prompt_text(get_template("Hermes-2"), [Message("user", ("<image>\nhi",))], [])
    assert P not in text and "<image>\nhi" in text
    assert expand_image_slots(text, [], tokens_per_tile=256) == text


def test_sentinel_in_client_text_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        build_prompt_text(get_template("Hermes-2"), [Message("user", (f"x{P}",))], [])
    assert info.value.param == "messages"


def test_media_outside_user_messages_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        build_prompt_text(get_template("Hermes-2"), [Message("assistant", (IMG,))], [[1]])


def test_expand_counts() -> None:
    text = f"a{P}b{P}c"
    out = expand_image_slots(text, [2, 1], tokens_per_tile=4)
    assert out == f"a<img>{'<IMG_CONTEXT>' * 8}</img>b<img>{'<IMG_CONTEXT>' * 4}</img>c"
    with pytest.raises(AssertionError):
        expand_image_slots(text, [1], tokens_per_tile=4)


def test_slot_tile_counts_flatten_in_order() -> None:
    assert slot_tile_counts([[7], [1, 1, 1], [2]]) == [7, 1, 1, 1, 2]


def test_tokens_per_tile() -> None:
    assert tokens_per_tile(448, 14, 0.5) == 256
    assert tokens_per_tile(32, 8, 0.5) == 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {
        w: i for i, w in enumerate(["[UNK]", "a", "b", "c", "x", "user", "assistant", "system", "\n", ":"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="\n", behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenize_prompt_counts_image_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = expand_image_slots(f"<|im_start|>{P}<|im_end|>", [2], tokens_per_tile=3)
    ids = tokenize_prompt(tokenizer, text, image_context_id=ctx, expected_image_tokens=6)
    assert ids.count(ctx) == 6 and len(ids) == 2 + 2 + 6


def test_tokenize_prompt_rejects_typed_context_token(tokenizer: PreTrainedTokenizerFast) -> None:
    ctx = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with pytest.raises(InvalidRequestError) as info:
        tokenize_prompt(tokenizer, "a<IMG_CONTEXT>b", image_context_id=ctx, expected_image_tokens=0)
    assert info.value.param == "messages"


def test_build_prompt_spans_and_typed_markers(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<IMG_CONTEXT>", "<img>", "</img>")}
    template = get_template("Hermes-2")
    kwargs = {"tokens_per_tile": 2, "image_context_id": ids["<IMG_CONTEXT>"]}
    markers = {"image_start_id": ids["<img>"], "image_end_id": ids["</img>"]}
    messages = [Message("user", (IMG, VID, "a"))]
    spec = build_prompt(template, messages, [[3], [1, 1]], tokenizer, **kwargs, **markers)
    assert spec.slot_tiles == (3, 1, 1)
    assert spec.image_token_count == 10
    assert [n for _, n in spec.image_spans] == [6, 2, 2]
    for start, n in spec.image_spans:
        assert spec.input_ids[start - 1] == ids["<img>"] and spec.input_ids[start + n] == ids["</img>"]
    typed = [Message("user", (IMG, "a <img> b"))]
    assert build_prompt(template, typed, [[1]], tokenizer, **kwargs).image_token_count == 2
    with pytest.raises(InvalidRequestError):
        build_prompt(template, typed, [[1]], tokenizer, **kwargs, **markers)
