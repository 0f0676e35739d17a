"""Conversation templates render exactly the reference's MPT prompts (REFERENCE.md §4)."""

from __future__ import annotations

import pytest

from model_runtime.errors import CheckpointError
from model_runtime.inputs.prompt import IMAGE_PLACEHOLDER, build_prompt_text, expand_image_slots
from model_runtime.inputs.templates import TEMPLATES, get_template, render, template_for_hf_checkpoint
from model_runtime.request import ImageInput, Message

SYS_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: E501
SYS_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501


def test_internvl2_5_one_image_of_seven_tiles() -> None:
    template = get_template("internvl2_5")
    text = build_prompt_text(template, [Message("user", (ImageInput(b""), "Describe."))], [[7]])
    expanded = expand_image_slots(text, [7], tokens_per_tile=256)
    assert expanded == (
        f"<|im_start|>system\n{SYS_2_5}<|im_end|>\n<|im_start|>user\n"
        f"<img>{'<IMG_CONTEXT>' * 1792}</img>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hermes_2_text_only() -> None:
    prompt = render(
        get_template("Hermes-2"), None, [("<|im_start|>user\n", "Hi"), ("<|im_start|>assistant\n", None)]
    )
    assert (
        prompt
        == f"<|im_start|>system\n{SYS_2}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_internlm2_chat() -> None:
    template = get_template("internlm2-chat")
    prompt = build_prompt_text(template, [Message("user", ("Hi",))], [])
    assert (
        prompt
        == f"<|im_start|>system\n{SYS_2}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_phi3_chat() -> None:
    template = get_template("phi3-chat")
    prompt = build_prompt_text(template, [Message("user", ("Hi",))], [])
    assert prompt == f"<|system|>\n{SYS_2}<|end|><|user|>\nHi<|end|><|assistant|>\n"
    assert template.stop_str == "<|end|>"


def test_multi_turn_history() -> None:
    template = get_template("internvl2_5")
    messages = [
        Message("user", (ImageInput(b""), "What is it?")),
        Message("assistant", ("A cat.",)),
        Message("user", ("What colour?",)),
    ]
    prompt = build_prompt_text(template, messages, [[1]])
    assert prompt == (
        f"<|im_start|>system\n{SYS_2_5}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_custom_system_message_replaces_default() -> None:
    template = get_template("internvl2_5")
    messages = [
        Message("system", ("Be brief.",)),
        Message("system", ("Use {braces}.",)),
        Message("user", ("Hi",)),
    ]
    prompt = build_prompt_text(template, messages, [])
    assert prompt.startswith("<|im_start|>system\nBe brief.\nUse {braces}.<|im_end|>\n<|im_start|>user\nHi")
    assert SYS_2_5 not in prompt


def test_empty_system_message_is_kept_empty() -> None:
    assert render(get_template("internvl2_5"), "", []) == "<|im_start|>system\n<|im_end|>\n"


def test_empty_assistant_message_renders_as_bare_role() -> None:
    template = get_template("Hermes-2")
    messages = [Message("user", ("Hi",)), Message("assistant", ("",)), Message("user", ("Again",))]
    prompt = build_prompt_text(template, messages, [])
    assert prompt.endswith(
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n<|im_start|>user\nAgain<|im_end|><|im_start|>assistant\n"
    )


def test_stop_strings() -> None:
    assert {name: t.stop_str for name, t in TEMPLATES.items()} == {
        "internvl2_5": "<|im_end|>",
        "Hermes-2": "<|im_end|>",
        "internlm2-chat": "<|im_end|>",
        "phi3-chat": "<|end|>",
    }


def test_unknown_template_names_the_known_ones() -> None:
    with pytest.raises(CheckpointError) as info:
        get_template("vicuna")
    assert isinstance(info.value, ValueError)
    assert (
        "'vicuna'" in str(info.value) and "internvl2_5" in str(info.value) and "phi3-chat" in str(info.value)
    )


@pytest.mark.parametrize(
    ("text_model_type", "expected"),
    [
        ("qwen2", "internvl2_5"),
        ("qwen3", "internvl2_5"),
        ("llama", "internvl2_5"),
        ("internlm2", "internlm2-chat"),
        ("phi3", "phi3-chat"),
    ],
)
def test_template_for_hf_checkpoint(text_model_type: str, expected: str) -> None:
    assert template_for_hf_checkpoint(text_model_type) == expected
    assert get_template(expected).name == expected


def test_template_for_unknown_hf_text_model() -> None:
    with pytest.raises(CheckpointError, match="mistral"):
        template_for_hf_checkpoint("mistral")
