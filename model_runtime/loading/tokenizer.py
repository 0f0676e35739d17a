"""The checkpoint's tokenizer, loaded without running any code the checkpoint ships."""

from __future__ import annotations

from pathlib import Path

from model_runtime.errors import CheckpointError


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, without running any code it ships."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    try:
        # AutoTokenizer reads config.json and warns that `internvl_chat` is unknown: true but not useful.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(previous)
    except Exception as exc:  # noqa: BLE001 - custom tokenizer classes (InternLM2) need a fallback
        if (path / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        if (path / "tokenizer.model").is_file():
            try:
                from transformers import LlamaTokenizerFast

                # InternLM2's tokenizer is a SentencePiece BPE with Llama's conventions (adds <s>).
                return LlamaTokenizerFast.from_pretrained(str(path))
            except Exception as inner:  # noqa: BLE001
                raise CheckpointError(
                    f"{path / 'tokenizer.model'}: cannot convert the SentencePiece tokenizer "
                    f"({type(inner).__name__}); install the 'sentencepiece' extra"
                ) from None
        raise CheckpointError(
            f"{path}: no usable tokenizer (tokenizer.json or tokenizer.model): {exc}"
        ) from None


def token_id(tokenizer, token: str, path: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{path}: the tokenizer has no {token!r} token, which InternVL prompts need")
    return int(token_id)
