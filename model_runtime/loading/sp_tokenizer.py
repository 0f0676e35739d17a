"""SentencePiece tokenizers as InternVL's checkpoints were trained and evaluated with them.

InternLM2-based checkpoints (InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B) ship `tokenizer.model` and
their own `InternLM2Tokenizer` class; Phi-3 (InternVL2-4B) and Yi (InternVL2-40B) ship
`tokenizer.model` for transformers' `LlamaTokenizer`. The model cards run both as transformers 4.x
"slow" tokenizers, whose rules decide the ids the models saw: the text is cut at added tokens first,
each piece between them goes through SentencePiece on its own (with the model file's own normalizer
settings), and `<s>` is prepended when `add_bos_token` says so. Neither transformers 5's converted
fast tokenizers nor a Llama-style conversion reproduce that exactly (InternLM2's converted tokenizer
dropped `<s>`), so this module restates those rules over the `sentencepiece` library itself.
Nothing the checkpoint ships is executed: only `tokenizer.model` and the JSON files are read.

The two dialects differ only where the original classes differ:
- `internlm2`: `InternLM2Tokenizer` (add_bos_token defaults to true). Decoding applies
  transformers' `clean_up_tokenization` unconditionally and puts a space before a run of special
  tokens, as that class's `convert_tokens_to_string` does.
- `llama`: `LlamaTokenizer` with its `legacy` switch. Legacy (the default when the config does not
  say) encodes each piece with the model's own dummy prefix; non-legacy turns the dummy prefix off,
  puts one "▁" before the whole text, and keeps pieces after special tokens unprefixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model_runtime.errors import CheckpointError

SPIECE_UNDERLINE = "▁"
Dialect = Literal["internlm2", "llama"]
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")
# The original classes' constructor defaults, before tokenizer_config.json overrides them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "internlm2": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
    },
    "llama": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,  # LlamaTokenizer's `legacy=None` means the legacy behaviour
        "add_prefix_space": True,
    },
}


@dataclass(frozen=True)
class AddedToken:
    """One entry of `added_tokens_decoder`: text that is never split and maps to one id."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def _token_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    raise CheckpointError(f"unexpected special token entry {value!r} in tokenizer_config.json")


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, which InternLM2Tokenizer applies to every decode."""
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


class SentencePieceTokenizer:
    """Encode and decode exactly as the original slow tokenizer class (see the module docstring)."""

    def __init__(self, model_file: Path, config: dict[str, Any], dialect: Dialect) -> None:
        import sentencepiece as spm

        self.dialect = dialect
        settings = {
            **_DEFAULTS[dialect],
            **{k: v for k, v in config.items() if v is not None or k == "pad_token"},
        }
        self.add_bos_token = bool(settings["add_bos_token"])
        self.add_eos_token = bool(settings["add_eos_token"])
        self.legacy = bool(settings.get("legacy", True)) if dialect == "llama" else True
        self.add_prefix_space = bool(settings.get("add_prefix_space", True))
        proto = model_file.read_bytes()
        if dialect == "llama" and not self.legacy:
            # As LlamaTokenizer.get_spm_processor: the prefix is added to the whole text instead.
            proto = without_dummy_prefix(proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as exc:  # noqa: BLE001 - a corrupt model file is the checkpoint's problem
            raise CheckpointError(f"{model_file}: not a SentencePiece model ({type(exc).__name__})") from None
        self.vocab_size = self.sp.get_piece_size()

        self._added: dict[str, AddedToken] = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            token = AddedToken(
                content=entry["content"],
                id=int(key),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
            )
            self._added[token.content] = token
        names = {attr: _token_text(settings.get(attr)) for attr in _SPECIAL_ATTRIBUTES}
        extra = [_token_text(t) for t in settings.get("additional_special_tokens") or []]
        # all_special_tokens, in transformers' order, without repeats.
        self.all_special_tokens: tuple[str, ...] = tuple(
            dict.fromkeys(t for t in [*names.values(), *extra] if t is not None)
        )
        # The slow base class registers every special token as an added token at construction: one
        # that the model file knows keeps its id, any other takes the next free id.
        for text in self.all_special_tokens:
            if text not in self._added:
                piece = self.sp.piece_to_id(text)
                if piece == self.sp.unk_id() and text != self.sp.id_to_piece(piece):
                    piece = max([self.vocab_size - 1, *(t.id for t in self._added.values())]) + 1
                self._added[text] = AddedToken(content=text, id=piece)
        self._added_by_id = {token.id: token for token in self._added.values()}
        self._splitter = (
            re.compile("|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)))
            if self._added
            else None
        )
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.unk_token, self.pad_token = names["unk_token"], names["pad_token"]
        if dialect == "internlm2":
            # InternLM2Tokenizer answers these from the SentencePiece model, not from the token strings.
            self.bos_token_id: int | None = self.sp.bos_id()
            self.eos_token_id: int | None = self.sp.eos_id()
        else:
            self.bos_token_id = self._id_of(self.bos_token)
            self.eos_token_id = self._id_of(self.eos_token)
        self.unk_token_id = self._id_of(self.unk_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.all_special_ids = frozenset(self._id_of(t) for t in self.all_special_tokens)
        # Added tokens that are not special decode as separate pieces joined by spaces (transformers'
        # "legacy added tokens"), as do additional special tokens beyond the model's vocabulary.
        self._legacy_added = (set(self._added) - set(self.all_special_tokens)) | {
            t for t in extra if t is not None and self._id_of(t) >= self.vocab_size
        }
        self._unk_length = len(self.sp.encode(str(self.unk_token))) if self.unk_token else 0

    # -- vocabulary ----------------------------------------------------------------------------------

    def added_tokens(self) -> tuple[str, ...]:
        """The texts that are single tokens, never split (chat markers, special tokens)."""
        return tuple(self._added)

    def __len__(self) -> int:
        return max([self.vocab_size - 1, *self._added_by_id]) + 1

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        if token in self._added:
            return self._added[token].id
        return self.sp.piece_to_id(token)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._id_of(token)

    def convert_ids_to_tokens(self, ids: Iterable[int], skip_special_tokens: bool = False) -> list[str]:
        """Token strings of ids. Ids the tokenizer does not know (a model's embedding is often padded
        past its tokenizer, and a sampled id may land there) have none, as in transformers' fast
        tokenizers; the slow classes would raise."""
        tokens = []
        for index in ids:
            index = int(index)
            if skip_special_tokens and index in self.all_special_ids:
                continue
            added = self._added_by_id.get(index)
            if added is not None:
                tokens.append(added.content)
            elif 0 <= index < self.vocab_size:
                tokens.append(self.sp.id_to_piece(index))
        return tokens

    # -- encoding ------------------------------------------------------------------------------------

    def _split(self, text: str) -> list[str]:
        """The text cut at added tokens (leftmost, longest first), with their strip flags applied."""
        if self._splitter is None:
            return [text]
        parts: list[str] = []
        last = 0
        for match in self._splitter.finditer(text):
            parts.extend((text[last : match.start()], match.group()))
            last = match.end()
        parts.append(text[last:])
        for i, part in enumerate(parts):
            token = self._added.get(part) if i % 2 else None
            if token is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif token.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        return parts

    def _tokenize(self, text: str) -> list[str]:
        if self.dialect == "llama" and not self.legacy and text.startswith((SPIECE_UNDERLINE, " ")):
            # The dummy prefix is off, so SentencePiece would drop a leading "▁": encode after the
            # unk token's text and cut its pieces off again, as LlamaTokenizer does.
            pieces = self.sp.encode(str(self.unk_token) + text, out_type=str)
            return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces
        return self.sp.encode(text, out_type=str)

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text`, without `<s>`/`</s>`."""
        non_legacy = self.dialect == "llama" and not self.legacy and len(text) > 0
        if non_legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        tokens: list[str] = []
        for i, part in enumerate(self._split(text)):
            if not part:
                continue
            if i % 2 and part in self._added:
                tokens.append(part)
            else:
                tokens.extend(self._tokenize(part))
        if (
            non_legacy
            and len(tokens) > 1
            and tokens[0] == SPIECE_UNDERLINE
            and tokens[1] in self.all_special_tokens
        ):
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id_of(token) for token in self.tokenize(text)]
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids  # type: ignore[return-value]

    def __call__(self, text: str, *, return_tensors: Literal["pt"] | None = None) -> dict[str, Any]:
        """`tokenizer(text)["input_ids"]` as transformers tokenizers answer it: a list, or [1, N] for "pt"."""
        ids = self.encode(text)
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor([ids])}
        if return_tensors is not None:
            raise ValueError(f"unsupported return_tensors {return_tensors!r}")
        return {"input_ids": ids}

    # -- decoding ------------------------------------------------------------------------------------

    def _pieces_to_string(self, tokens: list[str]) -> str:
        """The original class's convert_tokens_to_string."""
        if self.dialect == "internlm2":
            out, run, prev_special = "", [], False
            for token in tokens:
                if token in self.all_special_tokens:
                    if not prev_special:
                        out += " "
                    out += self.sp.decode_pieces(run) + token
                    prev_special, run = True, []
                else:
                    run.append(token)
                    prev_special = False
            out += self.sp.decode_pieces(run)
            # Its prefix-space step always adds a space that [1:] then removes.
            return clean_up_tokenization(out)
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        out, run, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.decode_pieces(run) + token
                prev_special, run = True, []
            else:
                if (
                    prev_special
                    and i == 1
                    and self.add_prefix_space
                    and not token.startswith(SPIECE_UNDERLINE)
                ):
                    out += " "
                run.append(token)
                prev_special = False
        return out + self.sp.decode_pieces(run)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """transformers 4.x PreTrainedTokenizer._decode with its defaults (spaces between added tokens,
        no extra clean-up)."""
        texts: list[str] = []
        run: list[str] = []
        for token in self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens):
            if token in self._legacy_added:
                if run:
                    string = self._pieces_to_string(run)
                    if string:
                        texts.append(string)
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._pieces_to_string(run))
        return " ".join(texts)


def without_dummy_prefix(proto: bytes) -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


def load_sentencepiece_tokenizer(path: Path, dialect: Dialect) -> SentencePieceTokenizer:
    """The tokenizer of a checkpoint directory holding tokenizer.model and tokenizer_config.json."""
    config_file = path / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot parse {config_file}: {exc}") from None
    special_map = path / "special_tokens_map.json"
    if special_map.is_file():
        # transformers fills special tokens the config does not name from this file.
        try:
            extra = json.loads(special_map.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot parse {special_map}: {exc}") from None
        for key, value in extra.items():
            if not config.get(key):
                config[key] = value
    if "added_tokens_decoder" not in config and (path / "added_tokens.json").is_file():
        # Older checkpoints list added tokens in added_tokens.json only (transformers' legacy path).
        try:
            table = json.loads((path / "added_tokens.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot parse {path / 'added_tokens.json'}: {exc}") from None
        config["added_tokens_decoder"] = {str(i): {"content": t} for t, i in table.items()}
    return SentencePieceTokenizer(path / "tokenizer.model", config, dialect)
