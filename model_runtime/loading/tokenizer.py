"""The checkpoint's tokenizer, loaded as the model card loads it, without running code it ships.

Which class the model card's `AutoTokenizer.from_pretrained(path, trust_remote_code=True,
use_fast=False)` builds decides the prompt ids, so the choice follows `tokenizer_config.json`:

- `InternLM2Tokenizer` (the checkpoint's own class, InternLM2 LLMs) and `LlamaTokenizer` over a
  `tokenizer.model` (Phi-3, Yi): the SentencePiece restatement in `sp_tokenizer`, which follows
  those slow classes' rules exactly (BOS, dummy prefix, added tokens never split).
- anything else (Qwen2's vocab.json + merges.txt, Llama 3's tokenizer.json): transformers'
  AutoTokenizer, whose tokenizers-backed classes give the slow classes' ids for these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_runtime.errors import CheckpointError
from model_runtime.loading.sp_tokenizer import SentencePieceTokenizer, load_sentencepiece_tokenizer

_SENTENCEPIECE_CLASSES = {"LlamaTokenizer": "llama", "LlamaTokenizerFast": "llama"}


def _tokenizer_class(path: Path) -> tuple[str | None, Any]:
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None, {}
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {config_file}: {exc}") from None
    auto_map = json.dumps(config.get("auto_map") or {})
    name = config.get("tokenizer_class")
    if name in ("InternLM2Tokenizer", "InternLM2TokenizerFast") or "tokenization_internlm2" in auto_map:
        return "internlm2", config
    return name, config


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer (see the module docstring for which class)."""
    name, _ = _tokenizer_class(path)
    if name == "internlm2" or (
        name in _SENTENCEPIECE_CLASSES
        and (path / "tokenizer.model").is_file()
        and not (path / "tokenizer.json").is_file()
    ):
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(
                f"{path}: tokenizer_config.json names {name}, but tokenizer.model is missing"
            )
        return load_sentencepiece_tokenizer(path, "internlm2" if name == "internlm2" else "llama")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json and warns that `internvl_chat` is unknown: true but not useful.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure is the checkpoint's tokenizer files
        raise CheckpointError(
            f"{path}: cannot load the tokenizer ({type(exc).__name__}); expected tokenizer.json, "
            "vocab.json + merges.txt, or tokenizer.model with tokenizer_config.json"
        ) from None
    finally:
        hf_logging.set_verbosity(previous)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers 4.x, which the model cards ran, applied this clean-up to BPE tokenizers too
        # (Llama 3's tokenizer asks for it: "Hello ." decodes as "Hello."); 5.x skips it unless told.
        tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tokenizer


def token_id(tokenizer, token: str, path: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{path}: the tokenizer has no {token!r} token, which InternVL prompts need")
    return int(token_id)


def text_normalizer(tokenizer) -> Callable[[str], str]:
    """The normalization the tokenizer applies to text before splitting it into tokens (Unicode
    composition, SentencePiece's whitespace and control-character rules): what max_token_bytes
    bounds. Normalizing may shorten a text a lot (a run of spaces collapsed, a control character
    dropped), so a bound from the raw bytes alone could refuse a prompt that fits."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.sp.normalize
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer.normalize_str if normalizer is not None else _unchanged


def _unchanged(text: str) -> str:
    return text


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token stands for, over the whole vocabulary
    (added tokens included): a text of n bytes is at least n / this many tokens. Prompt building
    uses it to refuse a text that cannot fit the context before tokenizing it."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        pieces += list(tokenizer.all_special_tokens) + tokenizer.convert_ids_to_tokens(
            range(tokenizer.vocab_size, len(tokenizer))
        )
    else:
        pieces = list(tokenizer.get_vocab())
    # Byte-level BPE writes a byte as one character of up to 2 UTF-8 bytes, SentencePiece a space
    # as "▁" (3 bytes): the encoded piece is never shorter than the text it stands for.
    return max(len(piece.encode("utf-8", "surrogatepass")) for piece in pieces)
