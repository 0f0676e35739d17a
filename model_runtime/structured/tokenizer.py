"""The served tokenizer as llguidance sees it: the bytes each token id stands for.

Masks are computed over the model's whole output vocabulary (the lm_head's rows, which may exceed
the tokenizer's length); ids the tokenizer does not know are never allowed. Added tokens (chat
markers, <img>, <IMG_CONTEXT>, InternLM2's <|action_start|>) are special: they never match text
inside a JSON string, only a grammar that names them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from llguidance import LLTokenizer, TokenizerWrapper

from model_runtime.loading.sp_tokenizer import SentencePieceTokenizer, without_dummy_prefix

# llguidance's marker for special tokens: a first byte no UTF-8 text contains.
_SPECIAL = b"\xff"


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> LLTokenizer:
    """An LLTokenizer for `tokenizer` over `vocab_size` logits; `eos_ids` end a finished grammar."""
    eos = sorted(set(eos_ids))
    if isinstance(tokenizer, SentencePieceTokenizer):
        return LLTokenizer(
            TokenizerWrapper(_SentencePieceVocabulary(tokenizer, eos[0])), n_vocab=vocab_size, eos_token=eos
        )
    # A fast (Rust) tokenizer: llguidance reads its serialized form, added tokens included.
    backend = tokenizer.backend_tokenizer
    return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


class Vocabulary:
    """Each token id's own bytes, for grammars and logprobs alike: one LLTokenizer per served model,
    built on first use (a 150k-token vocabulary takes about a second, so callers off the engine
    thread call `warm()` before the engine needs it)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._args = (tokenizer, vocab_size, tuple(eos_ids))
        self._known = len(tokenizer)
        # Logprobs read a token's bytes for every alternative of every position (a scored 30k-token
        # prompt with 5 alternatives: 180k reads), so each id is decoded once.
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}
        self._ll: LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll(self) -> LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = build_ll_tokenizer(*self._args)
            return self._ll

    def warm(self) -> None:
        self.ll  # noqa: B018 (built for its side effect)

    def token_bytes(self, token_id: int) -> bytes:
        data = self._bytes.get(token_id)
        if data is None:
            data = self._bytes[token_id] = self._token_bytes(token_id)
        return data

    def token_text(self, token_id: int) -> str:
        """The token as logprobs write it (token_string), one shared string per id."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = token_string(self.token_bytes(token_id))
        return text

    def _token_bytes(self, token_id: int) -> bytes:
        """What the token contributes to the text: a byte-level piece may be part of a character.
        Logit rows past the tokenizer's vocabulary (checkpoints pad the lm_head) stand for nothing."""
        if token_id >= self._known:
            return b""
        return self.ll.decode_bytes([token_id])


def token_string(data: bytes) -> str:
    """A token as OpenAI writes it in logprobs: its text, or for bytes that are not whole UTF-8
    characters (part of a CJK character or an emoji) `bytes:` and the bytes as \\xNN escapes; the
    `bytes` field rebuilds the text either way."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class _SentencePieceVocabulary:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, special ids, an encoder."""

    def __init__(self, tokenizer: SentencePieceTokenizer, eos_id: int) -> None:
        sp = tokenizer.sp
        added = set(tokenizer.added_tokens())
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token_id in range(len(tokenizer)):
            piece = tokenizer.convert_ids_to_tokens([token_id])[0]
            in_model = token_id < sp.get_piece_size()
            if piece in added or (in_model and (sp.is_control(token_id) or sp.is_unknown(token_id))):
                self.tokens.append(_SPECIAL + piece.encode("utf-8"))
                self.special_token_ids.append(token_id)
            elif in_model and sp.is_byte(token_id):
                self.tokens.append(bytes([int(piece[3:5], 16)]))  # "<0x41>"
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        # llguidance tokenizes pieces of text in the middle of an answer: no dummy-prefix space.
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(without_dummy_prefix(sp.serialized_model_proto()))

    def __call__(self, text: str) -> list[int]:
        return list(self._sp.encode(text))
