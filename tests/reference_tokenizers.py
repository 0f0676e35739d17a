"""The tokenizer classes InternVL's model cards run, restated from their source for the tests.

`AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)` under transformers 4.x
builds one of these "slow" classes: InternLM2Tokenizer (the checkpoint's own tokenization_internlm2.py),
LlamaTokenizer (Phi-3, Yi) or Qwen2Tokenizer; Llama 3 ships only tokenizer.json, for
PreTrainedTokenizerFast. Each is restated here from its code (transformers 4.44's
tokenization_utils.PreTrainedTokenizer.tokenize/_decode, tokenization_llama.py,
tokenization_qwen2.py, and InternVL's tokenization_internlm2.py), following its structure rather
than the server's: token strings first, ids from them, special tokens by string comparison. The
server's own tokenizers (model_runtime/loading) must give the same ids and the same decoded text.
(The same comparison was also run once outside the project against transformers 4.44.2's own
classes and InternVL's InternLM2Tokenizer on these tiny checkpoints: equal on every text.)
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SPIECE_UNDERLINE = "▁"


@dataclass
class Added:
    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def clean_up_tokenization(out_string: str) -> str:
    return (
        out_string.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _content(value):
    return value["content"] if isinstance(value, dict) else value


class SlowTokenizer:
    """transformers 4.x PreTrainedTokenizer: the parts every slow class shares."""

    defaults: dict = {}
    spaces_between_special_tokens = True

    def __init__(self, path: Path) -> None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        special_map = path / "special_tokens_map.json"
        if special_map.is_file():
            for key, value in json.loads(special_map.read_text()).items():
                if not config.get(key):
                    config[key] = value
        self.config = {
            **self.defaults,
            **{k: v for k, v in config.items() if v is not None or k == "pad_token"},
        }
        self.added_decoder: dict[int, Added] = {}
        for index, entry in (config.get("added_tokens_decoder") or {}).items():
            self.added_decoder[int(index)] = Added(
                entry["content"],
                entry.get("lstrip", False),
                entry.get("rstrip", False),
                entry.get("single_word", False),
            )
        self.load_vocabulary(path)
        specials = [
            _content(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        ]
        specials += [_content(t) for t in self.config.get("additional_special_tokens") or []]
        self.all_special_tokens = list(dict.fromkeys(t for t in specials if t is not None))
        self.additional_special_tokens = [
            _content(t) for t in self.config.get("additional_special_tokens") or []
        ]
        # PreTrainedTokenizer.__init__ adds the special tokens it does not know yet as added tokens.
        for token in self.all_special_tokens:
            if token not in self.added_encoder:
                index = self._convert_token_to_id(token)
                if self._convert_id_to_token(index) != token:
                    index = max([self.vocab_size - 1, *self.added_decoder]) + 1
                self.added_decoder[index] = Added(token)
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

    @property
    def added_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in self.added_decoder.items()}

    # subclasses: load_vocabulary, vocab_size, _tokenize, _convert_token_to_id, _convert_id_to_token,
    # convert_tokens_to_string, build_inputs_with_special_tokens

    def split_on_added(self, text: str) -> list[str]:
        """Trie.split: at the leftmost position where an added token starts, the longest one."""
        words = sorted(self.added_encoder, key=len, reverse=True)
        pieces, start, i = [], 0, 0
        while i < len(text):
            match = next((w for w in words if text.startswith(w, i)), None)
            if match is None:
                i += 1
                continue
            pieces += [text[start:i], match]
            i = start = i + len(match)
        pieces.append(text[start:])
        return [p for p in pieces if p] or [""]

    def prepare_for_tokenization(self, text: str) -> str:
        return text

    def tokenize(self, text: str) -> list[str]:
        text = self.prepare_for_tokenization(text)
        tokens = self.split_on_added(text)
        no_split = self.added_encoder
        for i, token in enumerate(tokens):
            if token in no_split:
                extended = self.added_decoder[no_split[token]]
                left = tokens[i - 1] if i > 0 else None
                right = tokens[i + 1] if i < len(tokens) - 1 else None
                if extended.rstrip and right:
                    tokens[i + 1] = right.lstrip()
                if extended.lstrip and left:
                    tokens[i - 1] = left.rstrip()
                if extended.single_word and left and left[-1] != " ":
                    tokens[i - 1] += token
                    tokens[i] = ""
                elif extended.single_word and right and right[0] != " ":
                    tokens[i + 1] = token + tokens[i + 1]
                    tokens[i] = ""
        out: list[str] = []
        for token in tokens:
            if not token:
                continue
            out.extend([token] if token in no_split else self._tokenize(token))
        return out

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        encoder = self.added_encoder
        return [encoder[t] if t in encoder else self._convert_token_to_id(t) for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.build_inputs_with_special_tokens(self.convert_tokens_to_ids(self.tokenize(text)))

    def special_id(self, name: str) -> int | None:
        token = _content(self.config.get(name))
        return None if token is None else self.convert_tokens_to_ids([token])[0]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        all_special_ids = set(self.convert_tokens_to_ids(self.all_special_tokens))
        tokens = []
        for index in ids:
            if skip_special_tokens and index in all_special_ids:
                continue
            if index in self.added_decoder:
                tokens.append(self.added_decoder[index].content)
            else:
                tokens.append(self._convert_id_to_token(index))
        legacy_added = set(self.added_encoder) - set(self.all_special_tokens) | {
            t for t in self.additional_special_tokens if self.convert_tokens_to_ids([t])[0] >= self.vocab_size
        }
        sub_texts, current = [], []
        for token in tokens:
            if token in legacy_added:
                if current:
                    string = self.convert_tokens_to_string(current)
                    if len(string) > 0:
                        sub_texts.append(string)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.convert_tokens_to_string(current))
        text = (" " if self.spaces_between_special_tokens else "").join(sub_texts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text


class SentencePieceSlow(SlowTokenizer):
    def load_vocabulary(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(str(path / "tokenizer.model"))

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.IdToPiece(index)


class InternLM2Tokenizer(SentencePieceSlow):
    """InternVL's tokenization_internlm2.py."""

    defaults = {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
    }

    def _tokenize(self, text: str) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def no_prefix_space_tokens(self) -> set[int]:
        vocab = [self._convert_id_to_token(i) for i in range(self.vocab_size)]
        return {i for i, tok in enumerate(vocab) if not tok.startswith(SPIECE_UNDERLINE)}

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        current, out, prev_is_special = [], "", False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_is_special:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special, current = True, []
            else:
                current.append(token)
                prev_is_special = False
        out += self.sp_model.decode(current)
        out = clean_up_tokenization(out)
        if tokens and tokens[0] not in self.no_prefix_space_tokens():  # a str never is in a set of ints
            out = " " + out
        return out[1:]

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.sp_model.bos_id()] if self.config["add_bos_token"] else []
        eos = [self.sp_model.eos_id()] if self.config["add_eos_token"] else []
        return bos + ids + eos


class LlamaTokenizer(SentencePieceSlow):
    """transformers' tokenization_llama.py (Phi-3, Yi)."""

    defaults = {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": True,
    }

    def load_vocabulary(self, path: Path) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.legacy = bool(self.config["legacy"])
        self.add_prefix_space = bool(self.config["add_prefix_space"])
        self.sp_model = spm.SentencePieceProcessor()
        proto = (path / "tokenizer.model").read_bytes()
        if not self.legacy:  # get_spm_processor
            model = sentencepiece_model_pb2.ModelProto.FromString(proto)
            spec = sentencepiece_model_pb2.NormalizerSpec()
            spec.add_dummy_prefix = False
            model.normalizer_spec.MergeFrom(spec)
            proto = model.SerializeToString()
        self.sp_model.LoadFromSerializedProto(proto)

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or len(text) == 0:
            return super().tokenize(text)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = super().tokenize(text)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def _tokenize(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        unk = _content(self.config["unk_token"])
        tokens = self.sp_model.encode(unk + text, out_type=str)
        unk_length = len(self.sp_model.encode(str(unk)))
        return tokens[unk_length:] if len(tokens) >= unk_length else tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        current, out, prev_is_special = [], "", False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special, current = True, []
            else:
                if (
                    prev_is_special
                    and i == 1
                    and self.add_prefix_space
                    and not token.startswith(SPIECE_UNDERLINE)
                ):
                    out += " "
                current.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(current)

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.special_id("bos_token")] if self.config["add_bos_token"] else []
        eos = [self.special_id("eos_token")] if self.config["add_eos_token"] else []
        return bos + ids + eos


@cache
def bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


class Qwen2Tokenizer(SlowTokenizer):
    """transformers' tokenization_qwen2.py (InternVL2-1B, InternVL2.5, InternVL3)."""

    defaults = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    spaces_between_special_tokens = False  # Qwen2Tokenizer.decode's default
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

    def load_vocabulary(self, path: Path) -> None:
        self.encoder = json.loads((path / "vocab.json").read_text())
        self.decoder = {v: k for k, v in self.encoder.items()}
        lines = (path / "merges.txt").read_text().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def prepare_for_tokenization(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)

    def bpe(self, token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _tokenize(self, text: str) -> list[str]:
        import regex

        out = []
        for token in regex.findall(self.pattern, text):
            out.extend(self.bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))))
        return out

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder.get(_content(self.config["unk_token"])))

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytearray([self.byte_decoder[c] for c in "".join(tokens)]).decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return ids


class FastTokenizer:
    """PreTrainedTokenizerFast over tokenizer.json (Llama 3): the tokenizers library, plus the
    clean-up transformers 4.x applied when the config asks for it."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = json.loads((path / "tokenizer_config.json").read_text())
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", True))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text


def reference_tokenizer(path: Path):
    """The class the model card's AutoTokenizer call builds for this checkpoint directory."""
    name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    classes = {
        "InternLM2Tokenizer": InternLM2Tokenizer,
        "LlamaTokenizer": LlamaTokenizer,
        "Qwen2Tokenizer": Qwen2Tokenizer,
    }
    return classes[name](path) if name in classes else FastTokenizer(path)
