"""Tokenizer files for the tiny random checkpoints, in the file set each InternVL family ships.

The real checkpoints differ in what they ship, and the loader must handle each as the model card
loads it, so the tiny checkpoints ship the same kinds of files with the same flags:

| family (tiny `--llm`) | real checkpoints | files | class, BOS |
|---|---|---|---|
| qwen2, qwen3 | InternVL2-1B, 2.5, 3 | vocab.json, merges.txt, added_tokens.json | Qwen2Tokenizer, no BOS |
| internlm2 | InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B | tokenizer.model | InternLM2Tokenizer, adds `<s>` |
| phi3 | InternVL2-4B, Mini-InternVL-4B | tokenizer.model | LlamaTokenizer (non-legacy), adds `<s>` |
| yi | InternVL2-40B | tokenizer.model | LlamaTokenizer (legacy), no BOS |
| llama | InternVL2-Llama3-76B | tokenizer.json | PreTrainedTokenizerFast, adds `<|begin_of_text|>` |

Vocabularies are trained here on a small fixed corpus (deterministic): enough merges for plausible
token lengths, with byte fallback (SentencePiece) or byte-level BPE so that any text encodes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

# InternVL's own tokens, added after the LLM's vocabulary in this order by its fine-tuning script.
INTERNVL_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
# InternLM2's chat markers sit at the top of its SentencePiece vocabulary as [UNUSED_TOKEN_141..146]
# pieces and get their names through added_tokens_decoder.
INTERNLM2_CHAT = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
]
PHI3_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
PHI3_RSTRIP = {"<|assistant|>", "<|system|>", "<|end|>", "<|user|>"}  # as Phi-3-mini's config marks them
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "You are a helpful assistant. Describe the image in detail. What is in the picture?",
    "The quick brown fox jumps over the lazy dog. A red panda is eating bamboo in the video.",
    "Image-1: Image-2: Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:",
    "Hello, who are you? Can you tell me a story? Please write a poem according to the image.",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，",
    "英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "system user assistant the a of and to in is that it for on with as was at by an be this",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 numbers, punctuation! question? colon: semicolon; quote's",
    "🐼 emoji and ünïcödé text: café, naïve, façade, 東京, 서울, Москва",
]


def _entry(content: str, *, special: bool = True, rstrip: bool = False) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _train_sentencepiece(vocab_size: int, *, add_dummy_prefix: bool, user_defined: list[str] | None = None):
    """A SentencePiece BPE model proto (byte fallback, identity normalization, whitespace kept)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=user_defined or [],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return sentencepiece_model_pb2.ModelProto.FromString(buffer.getvalue())


def _append_pieces(proto, pieces: list[str], piece_type: int) -> None:
    for text in pieces:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, 0.0, piece_type


def _write_internlm2(out: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2

    proto = _train_sentencepiece(420, add_dummy_prefix=False)
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    _append_pieces(proto, [f"[UNUSED_TOKEN_{141 + i}]" for i in range(len(INTERNLM2_CHAT))], unused)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    size = len(proto.pieces)
    added = {0: "<unk>", 1: "<s>", 2: "</s>"}
    added.update({size - len(INTERNLM2_CHAT) + i: t for i, t in enumerate(INTERNLM2_CHAT)})
    added.update({size + i: t for i, t in enumerate(INTERNVL_TOKENS)})
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(i): _entry(t) for i, t in sorted(added.items())},
            "additional_special_tokens": [*reversed(INTERNLM2_CHAT), *INTERNVL_TOKENS],
            "auto_map": {
                "AutoTokenizer": [
                    "tokenization_internlm2.InternLM2Tokenizer",
                    "tokenization_internlm2_fast.InternLM2TokenizerFast",
                ]
            },
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "</s>",
            "tokenizer_class": "InternLM2Tokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(out / "added_tokens.json", {t: size + i for i, t in enumerate(INTERNVL_TOKENS)})
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
    )


def _write_llama_sentencepiece(out: Path, *, family: str) -> None:
    """Phi-3 (Llama-2 vocabulary + Phi-3 chat tokens) or Yi (ChatML tokens inside the vocabulary)."""
    if family == "phi3":
        proto = _train_sentencepiece(420, add_dummy_prefix=True)
        size = len(proto.pieces)
        added = {0: _entry("<unk>"), 1: _entry("<s>"), 2: _entry("</s>", special=False)}
        added.update({size + i: _entry(t, rstrip=t in PHI3_RSTRIP) for i, t in enumerate(PHI3_TOKENS)})
        base = size + len(PHI3_TOKENS)
        added.update({base + i: _entry(t) for i, t in enumerate(INTERNVL_TOKENS)})
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "legacy": False,
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
            "additional_special_tokens": INTERNVL_TOKENS,
        }
        added_json = {t: base + i for i, t in enumerate(INTERNVL_TOKENS)}
    else:
        chat = ["<|startoftext|>", "<|endoftext|>"]
        user = ["<|im_start|>", "<|im_end|>", "<|im_sep|>", "<img>", "</img>"]
        proto = _train_sentencepiece(420, add_dummy_prefix=True, user_defined=user)
        proto.pieces[1].piece, proto.pieces[2].piece = chat  # Yi names its bos/eos this way
        size = len(proto.pieces)
        added = {0: _entry("<unk>"), 1: _entry(chat[0]), 2: _entry(chat[1])}
        ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        added.update({ids[t]: _entry(t) for t in user})
        late = [t for t in INTERNVL_TOKENS if t not in user]
        added.update({size + i: _entry(t) for i, t in enumerate(late)})
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": chat[0],
            "eos_token": "<|im_end|>",
            "legacy": True,
            "pad_token": "<unk>",
            "unk_token": "<unk>",
        }
        added_json = {t: size + i for i, t in enumerate(late)}
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {
        "added_tokens_decoder": {str(i): e for i, e in sorted(added.items())},
        **config,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "added_tokens.json", added_json)
    _write_json(
        out / "special_tokens_map.json",
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    )


def _byte_level_bpe(specials: list[str], vocab_size: int, pattern: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


# The pre-tokenizer patterns of Qwen2 (transformers' Qwen2Tokenizer) and Llama 3.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501


def _write_qwen(out: Path) -> None:
    """vocab.json + merges.txt + added tokens, as Qwen2Tokenizer saves them (no tokenizer.json)."""
    tokenizer = _byte_level_bpe([QWEN_TOKENS[0]], 500, QWEN2_PATTERN)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    del vocab[QWEN_TOKENS[0]]  # Qwen's special tokens are all added tokens after the vocabulary
    vocab = {piece: i for i, piece in enumerate(sorted(vocab, key=vocab.__getitem__))}
    _write_json(out / "vocab.json", vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {len(vocab) + i: t for i, t in enumerate(QWEN_TOKENS + INTERNVL_TOKENS)}
    _write_json(out / "added_tokens.json", {t: i for i, t in added.items()})
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): _entry(t) for i, t in added.items()},
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(out / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def _write_llama3(out: Path) -> None:
    """tokenizer.json only, with Llama 3's pre-tokenizer and a post-processor that adds the BOS."""
    from tokenizers import AddedToken, processors

    tokenizer = _byte_level_bpe(LLAMA3_TOKENS, 500, LLAMA3_PATTERN)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_TOKENS])
    bos = tokenizer.token_to_id(LLAMA3_TOKENS[0])
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{LLAMA3_TOKENS[0]}:0 $A:0",
                pair=f"{LLAMA3_TOKENS[0]}:0 $A:0 {LLAMA3_TOKENS[0]}:1 $B:1",
                special_tokens=[(LLAMA3_TOKENS[0], bos)],
            ),
        ]
    )
    data = json.loads(tokenizer.to_str())
    # Merges as "a b" strings, the format of the real tokenizer.json (and all that older tokenizers read).
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    _write_json(out / "tokenizer.json", data)
    added = {tokenizer.token_to_id(t): t for t in LLAMA3_TOKENS + INTERNVL_TOKENS}
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(i): _entry(t) for i, t in sorted(added.items())},
            "bos_token": LLAMA3_TOKENS[0],
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|im_end|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 8192,
            "pad_token": LLAMA3_TOKENS[1],
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def write_tokenizer(out: Path, family: str) -> None:
    """Write the tokenizer files of `family` (a tiny `--llm` kind) into `out`."""
    if family in ("qwen2", "qwen3"):
        _write_qwen(out)
    elif family == "internlm2":
        _write_internlm2(out)
    elif family in ("phi3", "yi"):
        _write_llama_sentencepiece(out, family=family)
    elif family == "llama":
        _write_llama3(out)
    else:
        raise ValueError(f"no tokenizer recipe for tiny LLM kind {family!r}")
