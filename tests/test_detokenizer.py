"""Incremental detokenization over byte-level BPE, and stop strings across token boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_runtime.engine.detokenizer import IncrementalDetokenizer, StopChecker

CORPUS = [
    "Hello world, this is a tiny corpus.",
    "你好世界，书生万象是多模态大模型。",
    "Emoji time 😀🎉👍 and more 🚀.",
    "Mixed: 猫 cat 🐱 dog 狗 <stop> END",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # A small vocabulary keeps merges short, so CJK characters and emoji span several tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    detok = IncrementalDetokenizer(tokenizer, stop_strings=stop)
    pieces = [detok.step(i) for i in ids]
    return pieces, detok.flush(), detok.stopped


def reference(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    """decode(all) cut before the stop string that completes first, checked character by character."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for end in range(len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)]
    return text


def test_multibyte_characters_split_over_tokens_never_emit_replacement(tokenizer: Tokenizer) -> None:
    text = "你好😀世界🐱猫"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text), "the test needs characters that span several tokens"
    pieces, tail, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == text
    assert tail == ""


def test_partial_character_at_the_end_is_flushed_as_decode_shows_it(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ab😀").ids[:-1]  # generation ended inside the emoji
    assert tokenizer.decode(ids) == "ab\ufffd"
    pieces, tail, _ = stream(tokenizer, ids)
    assert "".join(pieces) == "ab" and tail == "\ufffd"


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("cat").ids + [tokenizer.token_to_id("<|im_end|>")] + tokenizer.encode("dog").ids
    pieces, tail, _ = stream(tokenizer, ids)
    assert "".join(pieces) + tail == "catdog"


def test_stop_string_across_tokens_is_never_emitted(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_to_id(ch) for ch in "ab<stop>cd"]
    assert None not in ids
    pieces, tail, stopped = stream(tokenizer, ids, ("<stop>",))
    assert stopped and tail == ""
    assert "".join(pieces) == "ab"
    assert all("<" not in p for p in pieces)


def test_prefix_of_stop_is_held_then_emitted_when_not_a_stop(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_to_id(ch) for ch in "a<sto!b"]
    detok = IncrementalDetokenizer(tokenizer, stop_strings=("<stop>",))
    out = [detok.step(i) for i in ids]
    assert out[:5] == ["a", "", "", "", ""]
    assert out[5] == "<sto!" and out[6] == "b"
    assert not detok.stopped and detok.flush() == ""


def test_held_prefix_is_flushed_at_the_end(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_to_id(ch) for ch in "a<st"]
    pieces, tail, stopped = stream(tokenizer, ids, ("<stop>",))
    assert "".join(pieces) == "a" and tail == "<st" and not stopped


def test_stop_inside_multibyte_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("你好世界猫狗").ids
    pieces, tail, stopped = stream(tokenizer, ids, ("世界",))
    assert stopped and "".join(pieces) + tail == "你好"


def test_first_completed_stop_wins_whatever_the_chunking() -> None:
    for chunks in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        checker = StopChecker(("abcd", "bc"))
        out = "".join(checker.push(c) for c in chunks) + checker.flush()
        assert out == "a" and checker.matched == "bc"


def test_after_stop_nothing_more(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop_strings=("c",))
    assert detok.step(tokenizer.token_to_id("c")) == ""
    assert detok.stopped and detok.matched_stop == "c"
    assert detok.step(tokenizer.token_to_id("a")) == "" and detok.flush() == ""


def test_prompt_tail_gives_left_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Hello").ids
    out = tokenizer.encode(" world").ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids_tail=prompt)
    assert "".join(detok.step(i) for i in out) + detok.flush() == " world"


TEXTS = st.text(alphabet=st.sampled_from(list("ab <stop>你好界😀🎉猫")), max_size=30)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, stop=st.lists(st.sampled_from(["<stop>", "界😀", "ab", "b b", "🎉"]), max_size=3))
def test_stream_equals_decode_cut_at_first_stop(tokenizer: Tokenizer, text: str, stop: list[str]) -> None:
    ids = tokenizer.encode(text).ids
    pieces, tail, _ = stream(tokenizer, ids, tuple(stop))
    assert "".join(pieces) + tail == reference(tokenizer, ids, tuple(stop))
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=299), max_size=25))
def test_arbitrary_ids_concatenate_to_decode(tokenizer: Tokenizer, ids: list[int]) -> None:
    pieces, tail, _ = stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)


def test_sentencepiece_style_leading_space() -> None:
    # Metaspace drops the "▁" of the first token of a decode; the window keeps the previous token as
    # left context, so only the very first token loses its space, exactly as decode(all) does.
    vocab = {"[UNK]": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.decoder = decoders.Metaspace()
    ids = [1, 2, 3, 2]
    pieces, tail, _ = stream(tok, ids)
    assert pieces == ["Hello", " world", "!", " world"] and tail == ""
    assert "".join(pieces) == tok.decode(ids)
    detok = IncrementalDetokenizer(tok, prompt_ids_tail=[1])
    assert detok.step(2) == " world"
