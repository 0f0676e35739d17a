"""Each family's tokenizer gives the model card's prompt ids and decoded text (tests/reference_tokenizers.py).

The tiny tokenizers are written in the file set the real checkpoints ship (tiny_tokenizers.py); the
corpus mixes CJK, emoji, whitespace runs, special tokens inside text and the InternVL templates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_runtime.inputs.prompt import build_prompt_text, expand_image_slots
from model_runtime.inputs.templates import TEMPLATES
from model_runtime.loading.sp_tokenizer import SentencePieceTokenizer
from model_runtime.loading.tiny_tokenizers import INTERNVL_TOKENS, write_tokenizer
from model_runtime.loading.tokenizer import load_tokenizer, max_token_bytes, text_normalizer
from model_runtime.request import ImageInput, Message
from tests.reference_tokenizers import reference_tokenizer

FAMILIES = ("qwen2", "internlm2", "phi3", "yi", "llama")
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501
TEXTS = [
    "",
    " ",
    "   ",
    "Hello",
    " Hello",
    "Hello  world   spaces",
    "\n",
    "\n\nx",
    "a\n\n\n   b",
    "tab\tsep",
    "trailing ",
    "你好，世界",
    "🐼🐼 emoji",
    "café naïve ñ",
    "mixed 東京 and Москва",
    "don't ,  isn't . yes ! no ?",
    "123456789 3.14159",
    "text with <s> inside and </s> too",
    "<s>",
    "</s>x",
    " <img> spaced </img> ",
    "<IMG_CONTEXT><IMG_CONTEXT>",
    "[UNUSED_TOKEN_146]user",
    '<|action_start|><|plugin|>\n{"name": 1}<|action_end|>',
    "▁already▁underlined",
    "<unk> unknown",
    "<|begin_of_text|>x<|im_start|>assistant\n",
    "<|endoftext|>after",
    "<|system|>\nYou are terse.<|end|><|user|>\n  And?<|end|><|assistant|>\n",
]


def template_prompts() -> list[str]:
    """Every template's rendering of a system message, two images, an answer and a follow-up."""
    messages = (
        Message("system", (SYSTEM,)),
        Message("user", (ImageInput(b""), ImageInput(b""), "Compare them.")),
        Message("assistant", ("A cat and a dog.",)),
        Message("user", ("  And the colours? ",)),
    )
    out = []
    for template in TEMPLATES.values():
        text = build_prompt_text(template, messages, [[2], [1]])
        out.append(expand_image_slots(text, [2, 1], tokens_per_tile=3))
    return out


CORPUS = TEXTS + template_prompts()


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for family in FAMILIES:
        (root / family).mkdir()
        write_tokenizer(root / family, family)
        dirs[family] = root / family
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_text_equal_the_model_cards_tokenizer(family: str, tokenizer_dirs: dict[str, Path]) -> None:
    ours = load_tokenizer(tokenizer_dirs[family])
    reference = reference_tokenizer(tokenizer_dirs[family])
    for text in CORPUS:
        ids = reference.encode(text)
        assert ours(text)["input_ids"] == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            ), text


@pytest.mark.parametrize(
    ("family", "bos"),
    [("qwen2", None), ("internlm2", "<s>"), ("phi3", "<s>"), ("yi", None), ("llama", "<|begin_of_text|>")],
)
def test_bos_follows_each_family(family: str, bos: str | None, tokenizer_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tokenizer_dirs[family])
    ids = tokenizer("Hi")["input_ids"]
    plain = tokenizer.encode("Hi", add_special_tokens=False)
    assert ids == ([] if bos is None else [tokenizer.convert_tokens_to_ids(bos)]) + plain


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl_tokens_are_single_ids_never_split(family: str, tokenizer_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tokenizer_dirs[family])
    for token in INTERNVL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id is not None and token_id != tokenizer.unk_token_id
        ids = tokenizer(f"a{token}b")["input_ids"]
        assert ids.count(token_id) == 1


def test_internlm2_chat_markers_take_their_ids_from_the_config_not_the_model(
    tokenizer_dirs: dict[str, Path],
) -> None:
    """<|im_start|> overrides the [UNUSED_TOKEN_146] piece at the top of the SentencePiece vocabulary."""
    tokenizer = load_tokenizer(tokenizer_dirs["internlm2"])
    assert isinstance(tokenizer, SentencePieceTokenizer)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start == tokenizer.vocab_size - 1
    assert tokenizer.sp.id_to_piece(im_start) == "[UNUSED_TOKEN_146]"
    assert tokenizer.decode([im_start]) == " <|im_start|>"  # the original's space before a special run
    assert tokenizer("<|im_start|>user")["input_ids"][:2] == [tokenizer.bos_token_id, im_start]


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
def test_the_model_files_normalizer_settings_decide_the_prefix(
    add_dummy_prefix: bool, tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """InternLM2 follows the proto's add_dummy_prefix, whichever it is (not Llama's assumption)."""
    from sentencepiece import sentencepiece_model_pb2

    target = tmp_path / "tok"
    target.mkdir()
    for file in tokenizer_dirs["internlm2"].iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    proto = sentencepiece_model_pb2.ModelProto.FromString((target / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    (target / "tokenizer.model").write_bytes(proto.SerializeToString())
    ours, reference = load_tokenizer(target), reference_tokenizer(target)
    pieces = ours.tokenize("<|im_start|>user\nHello")
    assert pieces[1].startswith("▁") == add_dummy_prefix
    for text in CORPUS:
        assert ours(text)["input_ids"] == reference.encode(text), text


# Texts normalization shortens: decomposed Hangul (3 jamo -> 1 syllable), stacked combining marks,
# runs of spaces and control characters (which SentencePiece's rules collapse or drop).
_SHRINKING = st.text(
    alphabet=st.sampled_from(
        [
            "\u1100",
            "\u1161",
            "\u11a8",
            "e",
            "\u0301",
            "\u0323",
            "\u0302",
            " ",
            "\t",
            "\x01",
            "\u3000",
            "ﬁ",
            "a",
            "\n",
        ]
    ),
    max_size=200,
)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_SHRINKING, st.text(max_size=200)) | st.sampled_from(TEXTS))
def test_the_text_lower_bound_never_exceeds_the_real_count(
    family: str, text: str, tokenizer_dirs: dict[str, Path]
) -> None:
    """What the processor refuses prompts by before tokenizing must never refuse one that fits."""
    tokenizer = _loaded(tokenizer_dirs, family)
    bound = len(text_normalizer(tokenizer)(text).encode("utf-8")) // max_token_bytes(tokenizer)
    assert bound <= len(tokenizer.encode(text, add_special_tokens=False))


_LOADED: dict[str, object] = {}


def _loaded(tokenizer_dirs: dict[str, Path], family: str):
    if family not in _LOADED:
        _LOADED[family] = load_tokenizer(tokenizer_dirs[family])
    return _LOADED[family]
