"""Conversation templates of the original InternVL `conversation.py`, rendered MPT style.

Only the four templates InternVL chat checkpoints name in their config (`template`) are kept. The
strings are copied verbatim from the reference, Chinese default system messages included: the
models were trained with them, so changing a character changes the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_runtime.errors import CheckpointError

# The two default system messages of the reference (one per generation of checkpoints).
_SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501
_SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"  # noqa: E501


@dataclass(frozen=True)
class ConversationTemplate:
    """One MPT-style conversation template: system block, (user, assistant) roles and separator."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str

    @property
    def stop_str(self) -> str:
        """The text whose token ends an answer (the reference's EOS for `chat()`)."""
        return self.sep.strip()

    @property
    def user_role(self) -> str:
        return self.roles[0]

    @property
    def assistant_role(self) -> str:
        return self.roles[1]


class UnknownTemplateError(CheckpointError, ValueError):
    """A template name that is not one of the known InternVL templates."""


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        ConversationTemplate(
            name="internvl2_5",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2_5,
            roles=_CHATML_ROLES,
            sep="<|im_end|>\n",
        ),
        ConversationTemplate(
            name="Hermes-2",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
        ),
        ConversationTemplate(
            name="internlm2-chat",
            system_template="<|im_start|>system\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
        ),
        ConversationTemplate(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_SYSTEM_INTERNVL2,
            roles=("<|user|>\n", "<|assistant|>\n"),
            sep="<|end|>",
        ),
    )
}


def get_template(name: str) -> ConversationTemplate:
    """The template a checkpoint's config names; UnknownTemplateError lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise UnknownTemplateError(f"unknown conversation template {name!r}; known: {known}") from None


def render(
    template: ConversationTemplate,
    system_message: str | None,
    turns: Sequence[tuple[str, str | None]],
) -> str:
    """Render turns as the reference's `get_prompt()` (SeparatorStyle.MPT).

    `system_message` None keeps the template default; any string (even "") replaces it, as setting
    `model.system_message` does. A turn whose message is falsy renders as the bare role: that is how
    the open assistant turn at the end is written, and also what the reference does with an empty
    message anywhere else.
    """
    system = template.system_message if system_message is None else system_message
    # str.format, as the reference: braces in the client's system message are data, not fields,
    # because they come in through the argument, not the format string.
    parts = [template.system_template.format(system_message=system), template.sep]
    for role, message in turns:
        parts.append(role + message + template.sep if message else role)
    return "".join(parts)


# transformers-native ("-hf") checkpoints drop the `template` field, so the family is inferred from
# the text model. transformers' conversion script only converts InternVL2.5, InternVL3 and
# InternVL3.5 (its LM_TYPE_CORRESPONDENCE), all trained with `internvl2_5`; there, "llama" is an
# InternLM2/2.5/3 LLM mapped onto LlamaConfig (InternVL2.5-2B/8B/26B, InternVL3-9B), not Llama-3.
# InternVL2-Llama3-76B used Hermes-2, but no -hf conversion of it exists, so "llama" stays
# internvl2_5. "internlm2" and "phi3" can only come from InternVL2 weights converted by someone
# else; they get the templates those InternVL2 checkpoints were trained with.
_HF_TEXT_MODEL_TEMPLATES: dict[str, str] = {
    "qwen2": "internvl2_5",
    "qwen3": "internvl2_5",
    "qwen3_moe": "internvl2_5",
    "gpt_oss": "internvl2_5",
    "llama": "internvl2_5",
    "internlm2": "internlm2-chat",
    "phi3": "phi3-chat",
}


def template_for_hf_checkpoint(text_model_type: str) -> str:
    """The template name for a -hf checkpoint whose `text_config.model_type` is `text_model_type`."""
    try:
        return _HF_TEXT_MODEL_TEMPLATES[text_model_type]
    except KeyError:
        known = ", ".join(sorted(_HF_TEXT_MODEL_TEMPLATES))
        raise UnknownTemplateError(
            f"cannot infer the conversation template for text model type {text_model_type!r} "
            f"(known: {known}); set the template explicitly"
        ) from None
